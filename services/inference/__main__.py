"""The inference service. Its RPCs answer UNIMPLEMENTED until the service is built."""

from loramesh.v1 import inference_pb2
from services.common import server
from services.common.unimplemented import serve_unimplemented

if __name__ == "__main__":
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    server.main("inference", serve_unimplemented("inference", service))
