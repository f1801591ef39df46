"""The residency manager: one per service, it knows which models are loaded, where, and
how many bytes each holds; it loads lazily, evicts the least recently used when over
budget, and frees everything on request."""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Tells clients, from a model thread, that a model became resident or left:
# announce(loramesh.v1.EventKind, data naming the model). Hosts of one model take one.
Announce = Callable[[int, dict], None]


def not_announced(_kind: int, _data: dict) -> None:
    pass


class OneResident:
    """Keeps at most one model of a kind resident (one pipeline, one upscaler): the Residency
    owns it, under its key, so /vram/free and budgets see it; this remembers which key is
    current and announces when it goes (`unloaded_kind`, an event kind)."""

    unloaded_kind = 0

    def __init__(self, device, dtype, residency: Residency, announce: Announce = not_announced):
        self.device = device
        self.dtype = dtype
        self.announce = announce
        self._residency = residency
        self._key: str | None = None
        self._name = ""
        self._lock = threading.RLock()

    def _make_current(self, key: str, name: str) -> None:
        """Called under the lock before getting `key`: any other model goes first."""
        if self._key is not None and self._key != key:
            self._unload_current()
        self._key, self._name = key, name

    def _current(self) -> Resident | None:
        """The current model's entry, unless it was freed behind this host's back (/vram/free,
        a budget eviction)."""
        with self._lock:
            if self._key is None:
                return None
            resident = next((r for r in self._residency.resident() if r.name == self._key), None)
            if resident is None:
                self._key = None
            return resident

    def unload(self) -> Freed | None:
        with self._lock:
            return self._unload_current() if self._key is not None else None

    def _unload_current(self) -> Freed | None:
        key, self._key = self._key, None
        freed = self._residency.unload(key)
        if freed is not None:
            self.announce(self.unloaded_kind, {"model_name": self._name, "bytes": freed.nbytes})
        return freed


@dataclass
class Resident:
    name: str
    model: Any
    device: str
    nbytes: int
    last_used: float


@dataclass(frozen=True)
class Freed:
    name: str
    device: str
    nbytes: int
    action: str


class Residency:
    def __init__(self, max_bytes: int = 0):
        # 0 means no budget: models stay until unloaded or freed.
        self._max_bytes = max_bytes
        self._models: dict[str, Resident] = {}
        self._lock = threading.RLock()

    def get(self, name: str, load: Callable[[], tuple[Any, str, int]]) -> Any:
        """The resident model `name`, loading it with `load() -> (model, device, nbytes)`
        the first time. Loads are serialised so two requests never load the same model twice."""
        with self._lock:
            resident = self._models.get(name)
            if resident is None:
                model, device, nbytes = load()
                self._evict_for(nbytes)
                resident = Resident(name, model, device, nbytes, time.monotonic())
                self._models[name] = resident
            resident.last_used = time.monotonic()
            return resident.model

    def unload(self, name: str) -> Freed | None:
        with self._lock:
            resident = self._models.pop(name, None)
        if resident is None:
            return None
        _release_memory()
        return Freed(resident.name, resident.device, resident.nbytes, "unloaded")

    def free_all(self) -> list[Freed]:
        with self._lock:
            residents = list(self._models.values())
            self._models.clear()
        if residents:
            _release_memory()
        return [Freed(r.name, r.device, r.nbytes, "unloaded") for r in residents]

    def resident(self) -> list[Resident]:
        with self._lock:
            return list(self._models.values())

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._models.values())

    def _evict_for(self, incoming: int) -> None:
        if not self._max_bytes:
            return
        by_age = sorted(self._models.values(), key=lambda r: r.last_used)
        while by_age and self.total_bytes + incoming > self._max_bytes:
            self._models.pop(by_age.pop(0).name)
        _release_memory()


def module_bytes(*modules) -> int:
    """Bytes of the weights and buffers of torch modules (a pipeline's components, a model)."""
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def _release_memory() -> None:
    gc.collect()
    # Only a process that imported torch can hold CUDA memory through it.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
