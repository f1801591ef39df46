# The gRPC services, one image for all of them: the Deployment's command picks the service.
#   docker build -t loramesh .                                  # CPU (requirements/server-cpu.txt)
#   docker build --build-arg VARIANT=cuda -t loramesh-cuda .    # CUDA (requirements/server-cuda.txt)
# The events bridge has its own small image (Dockerfile.gateway).
# Debian 12 (glibc 2.36), the platform the locks are resolved for.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements/server-cpu.txt requirements/server-cuda.txt requirements/
COPY requirements-nodeps.txt ./
# The CPU lock pins torch's `+cpu` build, which only the PyTorch CPU index has; PyPI's Linux
# torch is the CUDA one, and with it the nvidia-* CUDA runtime wheels (no CUDA base image needed).
RUN case "$VARIANT" in \
      cpu) index="--extra-index-url https://download.pytorch.org/whl/cpu" ;; \
      cuda) index="" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac \
 && pip install $index -r requirements/server-$VARIANT.txt \
 && pip install --no-deps -r requirements-nodeps.txt
# One ONNX runtime, the variant's; onnxruntime-gpu must offer CUDA (it lists it without a GPU too).
RUN python -c "import os, importlib.metadata as md, onnxruntime; \
installed = {d.metadata['Name'].lower().replace('_', '-') for d in md.distributions()}; \
providers = onnxruntime.get_available_providers(); \
cuda = os.environ['VARIANT'] == 'cuda'; \
assert ('onnxruntime' if cuda else 'onnxruntime-gpu') not in installed, 'both ONNX runtimes are installed'; \
assert ('CUDAExecutionProvider' if cuda else 'CPUExecutionProvider') in providers, providers"
# The loramesh wheel: the client, the CLI and the gRPC stubs protoc generates while building it.
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY services services
COPY loramesh loramesh
RUN pip wheel --no-deps --wheel-dir /wheels . && pip install --no-deps /wheels/loramesh-*.whl

FROM ${PYTHON_IMAGE}
# Caches land in writable paths on a read-only root: /tmp (HOME) and /cache, where the
# Deployments mount a volume (Hugging Face remote-code modules, torch.compile's kernels).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH PYTHONPATH=/app \
    HOME=/tmp HF_MODULES_CACHE=/cache/hf-modules TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY services services
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp loramesh \
 && mkdir -p /cache/hf-modules /cache/torchinductor /cache/triton && chown -R 10001:10001 /cache
USER 10001
CMD ["python", "-m", "services.tagger"]
