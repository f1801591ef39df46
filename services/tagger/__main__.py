"""The tagger service: WD14 ONNX tagging of images and videos."""

from services.common import server
from services.tagger.servicer import register

if __name__ == "__main__":
    server.main("tagger", register)
