"""The captioner service: Florence-2, JoyCaption and audio captioning."""

from services.captioner.servicer import register
from services.common import server

if __name__ == "__main__":
    server.main("captioner", register)
