"""Who may do what on NATS: one user per service, with the subjects it publishes and
subscribes to and the JetStream streams, buckets and object stores it works with.

`render_authorization` turns the table into the `authorization` block of a nats-server
config. Passwords are never in it: each user's is the environment variable
`password_variable(user)` of the server process (in Kubernetes, from the
loramesh-nats-users Secret that deploy/k8s/make_secrets.py writes); the service connects
with the same value as LORAMESH_NATS_USER / LORAMESH_NATS_PASSWORD.
`make run` starts NATS without this block: one local server, no users.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass

EVENTS_STREAM = "EVENTS"


@dataclass(frozen=True)
class NatsUser:
    name: str
    # Streams it creates and reads through the JetStream API (work queues, EVENTS).
    streams: tuple[str, ...] = ()
    # Key-value buckets and object stores (their streams are KV_<name> and OBJ_<name>).
    buckets: tuple[str, ...] = ()
    object_stores: tuple[str, ...] = ()
    # Plain subjects it publishes (its work queues, its events and status, control requests).
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    def all_streams(self) -> list[str]:
        return [*self.streams, *(f"KV_{b}" for b in self.buckets), *(f"OBJ_{o}" for o in self.object_stores)]

    def publish_allowed(self) -> list[str]:
        # Replies to requests (control fan-outs) and the JetStream API's own replies land in inboxes.
        subjects = [*self.publish, "_INBOX.>"]
        subjects += [f"$KV.{bucket}.>" for bucket in self.buckets]
        subjects += [f"$O.{store}.>" for store in self.object_stores]
        if self.all_streams():
            subjects += ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
        for stream in self.all_streams():
            subjects += [
                f"$JS.API.STREAM.*.{stream}",  # CREATE, UPDATE, INFO, PURGE, DELETE
                f"$JS.API.STREAM.MSG.*.{stream}",  # GET, DELETE
                f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>",
                f"$JS.API.CONSUMER.*.{stream}", f"$JS.API.CONSUMER.*.{stream}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.*",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
                f"$JS.ACK.{stream}.>",  # ack, nak, in_progress, term
                f"$JS.FC.{stream}.>",  # flow control of push consumers (bucket watches)
            ]
        return subjects

    def subscribe_allowed(self) -> list[str]:
        return [*self.subscribe, "_INBOX.>"]


# Every replica answers /vram/free requests on this subject, and any may ask.
MEMORY_FREE = "control.memory.free"

USERS: tuple[NatsUser, ...] = (
    NatsUser(
        "trainer",
        streams=(EVENTS_STREAM, "TRAINER_SESSIONS", "TRAINER_TASKS", "TRAINER_LOSS"),
        buckets=("trainer_sessions", "trainer_tasks"),
        publish=("jobs.trainer.>", "events.trainer.>", "status.trainer.>", "trainer.loss.>", "control.trainer.>",
                 MEMORY_FREE),
        # jobs.trainer.tasks.*: a replica with a free slot hears new tasks as they are queued.
        subscribe=("jobs.trainer.tasks.*", "control.trainer.>", MEMORY_FREE),
    ),
    NatsUser(
        "captioner",
        streams=(EVENTS_STREAM,),
        publish=("events.captioner.>", "status.captioner.>", MEMORY_FREE),
        subscribe=(MEMORY_FREE,),
    ),
    NatsUser(
        "tagger",
        streams=(EVENTS_STREAM,),
        publish=("events.tagger.>", "status.tagger.>", MEMORY_FREE),
        subscribe=(MEMORY_FREE,),
    ),
    NatsUser(
        "inference",
        streams=(EVENTS_STREAM, "INFERENCE_JOBS"),
        buckets=("inference_jobs", "inference_state", "inference_llm", "inference_enhancements",
                 "inference_assistant"),
        object_stores=("inference_inputs",),
        publish=("jobs.inference", "events.inference.>", "status.inference.>", "control.inference.>", MEMORY_FREE),
        subscribe=("control.inference.>", MEMORY_FREE),
    ),
    # The WebSocket bridge only listens: to every event, and to every replica's status.
    NatsUser("events-bridge", subscribe=("events.>", "status.>")),
)


def new_password(length: int = 40) -> str:
    """A random password nats-server reads back from its environment as the same string: it
    parses a variable's value as config, so one starting with a digit ("1e5...") or spelling
    a word ("true") would turn into a number or a boolean. Letters and digits, a letter first."""
    letters = string.ascii_letters
    return secrets.choice(letters) + "".join(secrets.choice(letters + string.digits) for _ in range(length - 1))


def password_variable(user: str) -> str:
    """The nats-server environment variable that holds `user`'s password."""
    return "LORAMESH_NATS_PASSWORD_" + user.upper().replace("-", "_")


def _list(subjects: list[str], indent: str = "") -> str:
    if not indent:
        return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"
    return "[\n" + "".join(f'{indent}  "{s}"\n' for s in subjects) + indent + "]"


def render_authorization(users: tuple[NatsUser, ...] = USERS) -> str:
    """The nats-server `authorization` block: every user, its password variable and the only
    subjects it may publish and subscribe to. Anyone else is refused."""
    lines = ["authorization {", "  users = ["]
    for user in users:
        lines += [
            f'    {{user: "{user.name}", password: ${password_variable(user.name)}, permissions: {{',
            f"      publish: {{allow: {_list(user.publish_allowed(), '      ')}}}",
            f"      subscribe: {{allow: {_list(user.subscribe_allowed(), '      ')}}}",
            "    }}",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def render_server_config(*, cluster_routes: tuple[str, ...] = (), cluster_name: str = "loramesh",
                         server_name: str = "$POD_NAME", store_dir: str = "/data",
                         tls_dir: str | None = None) -> str:
    """A whole nats-server config for loramesh: client 4222, monitoring 8222, JetStream in
    `store_dir`, the users above and, with routes, a JetStream cluster on 6222. With
    `tls_dir` (holding tls.crt, tls.key, ca.crt), clients must speak TLS."""
    parts = [
        "# Generated by deploy/k8s/generate.sh from services/common/nats_auth.py: do not edit.",
        "port: 4222",
        "# Monitoring: the health probes and KEDA's nats-jetstream scaler read it.",
        "http_port: 8222",
        f"server_name: {server_name}",
        "",
        "jetstream {",
        f"  store_dir: {store_dir}",
        "  # Inside the container's memory limit and the 20Gi volume, with headroom.",
        "  max_memory_store: 512MB",
        "  max_file_store: 18GB",
        "}",
        "",
    ]
    if cluster_routes:
        parts += [
            "# The JetStream cluster: every stream and bucket keeps LORAMESH_NATS_REPLICAS copies.",
            "cluster {",
            f"  name: {cluster_name}",
            "  port: 6222",
            f"  routes: {_list(list(cluster_routes))}",
            "}",
            "",
        ]
    if tls_dir:
        parts += [
            "tls {",
            f'  cert_file: "{tls_dir}/tls.crt"',
            f'  key_file: "{tls_dir}/tls.key"',
            f'  ca_file: "{tls_dir}/ca.crt"',
            "  timeout: 5",
            "}",
            "",
        ]
    return "\n".join(parts) + "\n" + render_authorization()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Writes the loramesh nats-server config.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--route", action="append", default=[], help="a cluster route URL (repeat)")
    parser.add_argument("--tls-dir", help="folder of tls.crt, tls.key and ca.crt: clients must use TLS")
    args = parser.parse_args()
    with open(args.out, "w") as f:
        f.write(render_server_config(cluster_routes=tuple(args.route), tls_dir=args.tls_dir))


if __name__ == "__main__":
    main()
