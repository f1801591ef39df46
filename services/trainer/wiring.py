"""Builds the trainer inside a running process: the session and task stores, the runners
that train the sessions and tasks this replica takes, the API objects and their servicer;
and hooks them into start-up, shutdown and /vram/free."""

from __future__ import annotations

import asyncio

import grpc

from loramesh.v1 import trainer_pb2, trainer_pb2_grpc
from services.common.server import ServiceContext
from services.trainer.loss_history import LossHistory
from services.trainer.runner import SessionRunner
from services.trainer.servicer import TrainerServicer
from services.trainer.session_api import SessionAPI
from services.trainer.store import SessionStore
from services.trainer.task_api import TaskAPI
from services.trainer.task_runner import TaskRunner
from services.trainer.task_store import TaskStore


def register(server: grpc.aio.Server, ctx: ServiceContext) -> list[str]:
    settings = ctx.settings
    store = SessionStore(ctx.nats, ack_wait=settings.trainer.ack_wait_s)
    history = LossHistory(ctx.nats, settings.trainer.loss_history_points)
    runner = SessionRunner(settings, store, ctx.events, capacity=settings.trainer.max_sessions, history=history)
    task_store = TaskStore(ctx.nats, ack_wait=settings.trainer.ack_wait_s)
    task_runner = TaskRunner(runner, task_store)

    async def setup_stores() -> None:
        await store.setup()
        await task_store.setup()
        await history.setup()

    async def start() -> None:
        await setup_stores()
        runner.start()
        task_runner.start()

    async def free_memory():
        return [*await runner.free_memory(), *await asyncio.to_thread(ctx.residency.free_all)]

    ctx.free_memory = free_memory
    ctx.on_shutdown.append(task_runner.stop)
    ctx.on_shutdown.append(runner.stop)
    ctx.on_start.append(start)
    ctx.on_reconnect.append(setup_stores)
    servicer = TrainerServicer(SessionAPI(settings, store, ctx.events, history), TaskAPI(settings, task_store))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    return [trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name]
