"""One thread for a component's model work. torch runs several times slower when its
calls hop between threads (each thread brings up its own OpenMP team), which is what
asyncio.to_thread does; one thread per component also serialises use of its device."""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor


class ModelThread:
    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)

    async def run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                 functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=False)
