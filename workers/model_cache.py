"""Predictors loaded lazily by import path, set up once per process and cached.

The model registry says which predictor class serves a model (and where a trained model's artifact
is); the runtime imports it by name, so the worker package depends on no service (import-linter
checks it) and each worker image carries only its own framework.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from percept.predictor import ModelInfo, Predictor
from percept.services import import_by_name
from workers import observe


@dataclass(frozen=True)
class ModelSource:
    """How to build a model's predictor: its class, and for trained models the artifact bytes."""

    name: str
    version: str
    predictor: str  # "module:Class"
    artifact: bytes | None = None


@dataclass
class LoadedModel:
    predictor: Predictor
    info: ModelInfo
    load_ms: float  # what loading cost the first job; 0 for every job after it


class ModelCache:
    """The models a worker serves, kept warm: at most `max_models`, and on an accelerator no more than its
    memory holds (`ModelInfo.memory_bytes` within `device_memory_bytes` times `memory_fraction`), the least
    recently used evicted first (its predictor's `close()`, if any, frees its memory)."""

    memory_fraction = 0.9  # of the accelerator's memory, for weights: the rest is activations' working space

    def __init__(self, max_models: int = 8) -> None:
        self.max_models = max_models
        self._loaded: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, key: str, source: Callable[[], ModelSource]) -> LoadedModel:
        """The model under `key` (tenant + name:version), built from `source()` on first use.

        The load time is reported once, to the job that paid it.
        """
        with self._lock:
            if key in self._loaded:
                cached = self._loaded.pop(key)
                self._loaded[key] = cached  # most recently used last
                return LoadedModel(cached.predictor, cached.info, 0.0)
            started = time.perf_counter()
            spec = source()
            predictor_class = import_by_name(spec.predictor)
            predictor = (predictor_class(artifact=spec.artifact, name=spec.name, version=spec.version)
                         if spec.artifact is not None else predictor_class())
            try:
                info = predictor.setup()
            except Exception:
                if not self._loaded:
                    raise
                # Perhaps no room beside the models held (a full GPU): free them all and try once more
                self._evict(len(self._loaded))
                info = predictor.setup()
            loaded = LoadedModel(predictor, info, (time.perf_counter() - started) * 1000)
            observe.model_loaded(spec, info.device, loaded.load_ms / 1000)
            self._evict(len(self._loaded) + 1 - self.max_models)
            while self._loaded and info.device_memory_bytes and self._memory(info) > \
                    info.device_memory_bytes * self.memory_fraction:
                self._evict(1)
            self._loaded[key] = loaded
            return loaded

    def _memory(self, new: ModelInfo) -> int:
        """What the held models on `new`'s device, and `new`, take there."""
        return new.memory_bytes + sum(held.info.memory_bytes for held in self._loaded.values()
                                      if held.info.device == new.device)

    def _evict(self, count: int) -> None:
        """Drop the `count` least recently used models."""
        for _ in range(max(count, 0)):
            evicted = self._loaded.pop(next(iter(self._loaded)))
            close = getattr(evicted.predictor, "close", None)
            if close is not None:
                close()

    def keys(self) -> list[str]:
        """The models held, least recently used first."""
        return list(self._loaded)
