"""Generates the gRPC stubs (loramesh.v1.*) into the wheel while building it.

The stubs are not committed: protoc runs here with the same code `make protos` uses.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(ROOT))
        from services.common import protos_build

        with tempfile.TemporaryDirectory() as tmp:
            protos_build.build(Path(tmp))  # also writes the descriptor set, which the wheel leaves out
            shutil.copytree(Path(tmp) / "loramesh", Path(self.build_lib) / "loramesh", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithStubs})
