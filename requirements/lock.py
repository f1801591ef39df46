"""Resolves pyproject.toml's dependency sets into the lock files beside this script.

    python requirements/lock.py            # rewrite requirements/*.txt (`make lock`)
    python requirements/lock.py --check    # exit 1 when a lock no longer matches its inputs

Every lock is resolved with uv for CPython 3.11 on x86_64 Linux (the images' platform). A lock
that exists is uv's starting point, so versions only move when the inputs ask for it (or with
--upgrade). The shared versions follow server-cpu: the other sets are constrained by it.
"""

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# Where the `+cpu` torch builds are when neither uv nor pip is told of a local wheel folder.
TORCH_CPU_PAGE = "https://download.pytorch.org/whl/cpu/torch/"
# glibc 2.36: Debian 12, the images' base.
UV_TARGET = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_36"]


@dataclass(frozen=True)
class LockSet:
    name: str
    extras: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # .in files beside this script
    cpu_torch: bool = False  # searches the CPU torch wheels
    follow_cpu: bool = True  # constrained by the server-cpu lock (torch left out)


SETS = [
    LockSet("server-cpu", ("server", "cpu"), ("server-cpu.in",), cpu_torch=True, follow_cpu=False),
    LockSet("server-cuda", ("server", "cuda"), ("server-cuda.in",)),
    LockSet("client"),
    LockSet("gateway", ("gateway",)),
    # The development venv: the CPU server set plus tests and tooling.
    LockSet("dev", ("server", "cpu", "dev"), ("server-cpu.in",), cpu_torch=True),
]


def torch_cpu_links() -> list[str]:
    links = os.environ.get("UV_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS") or TORCH_CPU_PAGE
    return [arg for link in links.split() for arg in ("--find-links", link)]


def compile_set(lock: LockSet, scratch: Path, upgrade: bool) -> Path:
    """Resolves one set inside `scratch`, a copy of the inputs, so the lock names them by relative path."""
    out = scratch / "requirements" / f"{lock.name}.txt"
    cmd = [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--custom-compile-command", "make lock",
           *UV_TARGET, "pyproject.toml", *(f"requirements/{name}" for name in lock.inputs)]
    cmd += [arg for extra in lock.extras for arg in ("--extra", extra)]
    if lock.cpu_torch:
        cmd += torch_cpu_links()
    if lock.follow_cpu and lock.name == "server-cuda":
        # The server-cpu pins less torch itself, so that the CUDA build resolves under them.
        pins = (scratch / "requirements" / "server-cpu.txt").read_text().splitlines()
        keep = "".join(f"{pin}\n" for pin in pins if not pin.startswith("torch=="))
        (scratch / "server-cpu-without-torch.txt").write_text(keep)
        cmd += ["--constraint", "server-cpu-without-torch.txt"]
    elif lock.follow_cpu:
        cmd += ["--constraint", "requirements/server-cpu.txt"]
    if upgrade:
        cmd.append("--upgrade")
    env = {k: v for k, v in os.environ.items() if k != "UV_FIND_LINKS"}  # only the CPU sets see them
    subprocess.run([*cmd, "--output-file", str(out.relative_to(scratch))], cwd=scratch, env=env, check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare fresh resolutions with the committed locks")
    parser.add_argument("--upgrade", action="store_true", help="move every pin to the newest allowed version")
    args = parser.parse_args()
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        shutil.copy(ROOT / "pyproject.toml", scratch)
        # The .in files, and the committed locks as uv's starting point: it keeps the versions
        # of the file it writes to.
        shutil.copytree(HERE, scratch / "requirements", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        for lock in SETS:
            out = compile_set(lock, scratch, args.upgrade)
            committed = HERE / out.name
            old = committed.read_text() if committed.exists() else ""
            if out.read_text() == old:
                continue
            if not args.check:
                shutil.copy(out, committed)
                continue
            stale.append(lock.name)
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(keepends=True), out.read_text().splitlines(keepends=True),
                str(committed.relative_to(ROOT)), "resolved now"))
    if stale:
        print(f"stale locks: {', '.join(stale)}; run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
