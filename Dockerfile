# One image for every service; the Deployment's command picks the service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app:/app/gen
WORKDIR /app

COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY protos protos
COPY services services
COPY gateway gateway
RUN python -m services.common.protos_build --out gen

RUN useradd --uid 10001 --user-group --no-create-home loramesh
USER 10001

CMD ["python", "-m", "services.tagger"]
