"""The static files the gateway serves at /docs and /dashboard, each mapped to its URL path:
our own pages (gateway/web/), Swagger UI and the chart library (uPlot) from their pinned npm
tarballs. Each tarball is fetched once with `npm pack`, checked against its registry
integrity (sha512) and unpacked into a git-ignored folder; a page loads nothing from
outside (no CDN). Swagger UI comes from npm because the Python wheels carry Swagger UI 4,
which cannot render an OpenAPI 3.1 document.

    python -m gateway.web_assets     # fetches what is not there yet
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

WEB_DIR = Path(__file__).parent / "web"
VENDOR_DIR = WEB_DIR / "vendor"  # git-ignored


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball
    files: tuple[str, ...]  # taken from the tarball's package/ folder

    @property
    def folder(self) -> Path:
        return VENDOR_DIR / f"{self.name}-{self.version}"


SWAGGER_UI = NpmPackage(
    "swagger-ui-dist", "5.35.0",
    "sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ==",
    ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css", "favicon-32x32.png", "LICENSE"))
UPLOT = NpmPackage(
    "uplot", "1.6.32",
    "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==",
    ("dist/uPlot.iife.min.js", "dist/uPlot.min.css", "LICENSE"))
PACKAGES = (SWAGGER_UI, UPLOT)

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png", "": "text/plain; charset=utf-8"}


def ensure(package: NpmPackage) -> Path:
    """The package's folder, its files unpacked there (fetched and checked when missing)."""
    if all((package.folder / Path(name).name).is_file() for name in package.files):
        return package.folder
    spec = f"{package.name}@{package.version}"
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(["npm", "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {spec} failed: {done.stderr.strip()}")
        tarball = (Path(tmp) / done.stdout.strip().splitlines()[-1]).read_bytes()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != package.integrity:
        raise RuntimeError(f"{spec}: integrity {digest} is not the pinned {package.integrity}")
    partial = package.folder.with_name(package.folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for name in package.files:
            (partial / Path(name).name).write_bytes(archive.extractfile(f"package/{name}").read())
    shutil.rmtree(package.folder, ignore_errors=True)
    partial.rename(package.folder)
    return package.folder


def static_files() -> dict[str, Path]:
    """URL path -> file, for every page and asset of /docs and /dashboard."""
    swagger, uplot = ensure(SWAGGER_UI), ensure(UPLOT)
    files = {"/docs": WEB_DIR / "docs.html", "/docs/docs.js": WEB_DIR / "docs.js",
             "/dashboard": WEB_DIR / "dashboard.html", "/dashboard/dashboard.js": WEB_DIR / "dashboard.js",
             "/dashboard/dashboard.css": WEB_DIR / "dashboard.css"}
    files.update({f"/docs/{Path(name).name}": swagger / Path(name).name for name in SWAGGER_UI.files})
    files.update({f"/dashboard/{Path(name).name}": uplot / Path(name).name for name in UPLOT.files})
    return files


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix, CONTENT_TYPES[""])


if __name__ == "__main__":
    for package in PACKAGES:
        print(ensure(package))
