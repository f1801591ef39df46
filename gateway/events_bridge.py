"""NATS → WebSocket bridge: every event published on `events.>`, and every replica's periodic
`server_status` (`status.>`), reaches every connected WebSocket client in the documented
message shape {"event", "timestamp", "data"}.

A client may narrow what it receives with query parameters, each repeatable:
`ws://host:8081/?service=inference&subject_id=<job id>&event=job_progress`.
GET /healthz answers 200 while the bridge runs.

    python -m gateway.events_bridge --nats nats://127.0.0.1:4222 --host 127.0.0.1 --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import nats.errors
from google.protobuf.timestamp_pb2 import Timestamp
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.asyncio.server import serve as ws_serve

from loramesh.v1 import events_pb2
from services.common import bus, logs

log = logs.get(__name__)

FILTER_KEYS = ("service", "subject_id", "event")


def to_client_message(event: dict) -> dict:
    """The documented WebSocket message for a loramesh.v1.Event (as JSON)."""
    service = event.get("service", "")
    kind_name = event.get("kind", "EVENT_KIND_UNSPECIFIED")
    kind = events_pb2.EventKind.Value(kind_name) if kind_name in events_pb2.EventKind.keys() else 0
    data = dict(event.get("data") or {})
    name = bus.client_event_name(service, kind) if kind in bus.EVENT_KINDS else f"{service}_unspecified"
    if service == "inference" and kind in bus.JOB_EVENT_KINDS:
        data.setdefault("job_id", event.get("subject_id", ""))
    elif service != "inference":  # the generation server's model events are documented as they are
        data.setdefault("id", event.get("subject_id", ""))
        data.setdefault("service", service)
    time = Timestamp()
    with contextlib.suppress(ValueError):
        time.FromJsonString(event.get("time", ""))
    return {"event": name, "timestamp": bus.client_timestamp(time), "data": data}


def client_filter(path: str) -> dict[str, set[str]]:
    """The filter a client asked for in its URL's query; ValueError names an unknown key."""
    query = parse_qs(urlsplit(path).query)
    unknown = sorted(set(query) - set(FILTER_KEYS))
    if unknown:
        raise ValueError(f"unknown filter {', '.join(unknown)}; use {', '.join(FILTER_KEYS)}")
    return {key: set(values) for key, values in query.items()}


class Bridge:
    def __init__(self) -> None:
        self.clients: dict[ServerConnection, dict[str, set[str]]] = {}

    async def handle(self, connection: ServerConnection) -> None:
        self.clients[connection] = client_filter(connection.request.path)
        try:
            await connection.wait_closed()
        finally:
            self.clients.pop(connection, None)

    async def on_event(self, msg) -> None:
        try:
            event = json.loads(msg.data)
            message = to_client_message(event)
        except (ValueError, AttributeError):
            log.warning("dropped malformed event", subject=msg.subject)
            return
        fields = {"service": event.get("service", ""), "subject_id": event.get("subject_id", ""),
                  "event": message["event"]}
        wanted = [client for client, wants in self.clients.items()
                  if all(fields[key] in values for key, values in wants.items())]
        broadcast(wanted, json.dumps(message))


def _process_request(connection: ServerConnection, request):
    """Answers the health check, and refuses a WebSocket whose filter is wrong."""
    if request.path == "/healthz":
        return connection.respond(HTTPStatus.OK, "ok\n")
    try:
        client_filter(request.path)
    except ValueError as exc:
        return connection.respond(HTTPStatus.BAD_REQUEST, f"{exc}\n")
    return None


async def serve(nats_url: str, host: str, port: int) -> None:
    bridge = Bridge()
    nc = await bus.connect(nats_url, name="events-bridge")
    await nc.subscribe("events.>", cb=bridge.on_event)
    # Every replica's periodic server_status (bus.EventPublisher.publish_status).
    await nc.subscribe(bus.STATUS_SUBJECTS, cb=bridge.on_event)
    async with ws_serve(bridge.handle, host, port, process_request=_process_request) as server:
        log.info("serving", host=host, port=port)
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.cancel)
        try:
            await stop
        except asyncio.CancelledError:
            pass
        server.close()
    try:
        await asyncio.wait_for(nc.drain(), timeout=5)
    except (TimeoutError, nats.errors.Error):
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    logs.configure("events-bridge")
    asyncio.run(serve(args.nats, args.host, args.port))


if __name__ == "__main__":
    main()
