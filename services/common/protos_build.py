"""Generates the Python stubs and the descriptor set from protos/ with grpcio-tools."""

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
DESCRIPTOR_NAME = "loramesh.pb"
EXTRA_DESCRIPTOR_PROTOS = ["google/rpc/error_details.proto"]


def include_dirs() -> list[str]:
    """protos/, grpc_tools' well-known types and googleapis-common-protos' sources."""
    import google.api  # googleapis-common-protos ships annotations.proto beside its modules

    googleapis_root = Path(google.api.__path__[0]).parent.parent
    well_known = resources.files("grpc_tools") / "_proto"
    return [str(PROTO_DIR), str(well_known), str(googleapis_root)]


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    includes = [f"-I{d}" for d in include_dirs()]
    descriptor = out / DESCRIPTOR_NAME
    stubs = ["protoc", *includes, f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    # The descriptor also carries google.rpc error details, so Envoy can render the
    # BadRequest detail of an error as JSON.
    descriptor_set = ["protoc", *includes, "--include_imports", "--include_source_info",
                      f"--descriptor_set_out={descriptor}", *protos, *EXTRA_DESCRIPTOR_PROTOS]
    if protoc.main(stubs) != 0 or protoc.main(descriptor_set) != 0:
        sys.exit("protoc failed")
    # `loramesh` stays a namespace package: the client and CLI (`loramesh/` in the repository)
    # and these stubs share it.
    (out / "loramesh" / "v1" / "__init__.py").touch()
    return descriptor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "gen")
    print(build(parser.parse_args().out))


if __name__ == "__main__":
    main()
