"""Builds the trainer inside a running process: the session store, the runner that trains
the sessions this replica takes, the API object and its servicer; and hooks them into
start-up, shutdown and /vram/free."""

from __future__ import annotations

import asyncio

import grpc

from loramesh.v1 import trainer_pb2
from services.common.server import ServiceContext
from services.common.unimplemented import generic_handler
from services.trainer.runner import SessionRunner
from services.trainer.servicer import SESSION_METHODS, TrainerServicer
from services.trainer.session_api import SessionAPI
from services.trainer.store import SessionStore


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    settings = ctx.settings
    store = SessionStore(ctx.nats, ack_wait=settings.trainer.ack_wait_s)
    runner = SessionRunner(settings, store, ctx.events, capacity=settings.trainer.max_sessions)

    async def start() -> None:
        await store.setup()
        runner.start()

    async def free_memory():
        return [*await runner.free_memory(), *await asyncio.to_thread(ctx.residency.free_all)]

    ctx.free_memory = free_memory
    ctx.on_shutdown.append(runner.stop)
    ctx.on_start.append(start)
    ctx.on_reconnect.append(store.setup)
    service = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]
    servicer = TrainerServicer(SessionAPI(settings, store, ctx.events))
    server.add_generic_rpc_handlers((generic_handler(service, "trainer", servicer, SESSION_METHODS),))
    return [service.full_name]
