# One image for every service; the Deployment's command picks the service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app:/app/gen
# Caches (~/.cache and the like) land in /tmp, the one writable place on a read-only root.
ENV HOME=/tmp
WORKDIR /app

COPY requirements.txt requirements-nodeps.txt ./
RUN pip install --no-cache-dir -r requirements.txt && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

COPY protos protos
COPY services services
COPY gateway gateway
RUN python -m services.common.protos_build --out gen

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp loramesh
USER 10001

CMD ["python", "-m", "services.tagger"]
