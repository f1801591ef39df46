"""The inference service: both generation APIs over one job queue in NATS."""

from services.common import server
from services.inference.wiring import register

if __name__ == "__main__":
    server.main("inference", register)
