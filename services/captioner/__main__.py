"""The captioner service. Its RPCs answer UNIMPLEMENTED until the service is built."""

from loramesh.v1 import captioner_pb2
from services.common import server
from services.common.unimplemented import serve_unimplemented

if __name__ == "__main__":
    service = captioner_pb2.DESCRIPTOR.services_by_name["CaptionerService"]
    server.main("captioner", serve_unimplemented("captioner", service))
