"""The trainer service. Its RPCs answer UNIMPLEMENTED until the service is built."""

from loramesh.v1 import trainer_pb2
from services.common import server
from services.common.unimplemented import serve_unimplemented

if __name__ == "__main__":
    service = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
    server.main("trainer", serve_unimplemented("trainer", service))
