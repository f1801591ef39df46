"""The trainer service: step-budget LoRA training sessions."""

from services.common import server
from services.trainer.servicer import register

if __name__ == "__main__":
    server.main("trainer", register)
