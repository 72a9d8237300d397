"""The worker's model cache keeps models warm: at most `max_models`, and on an accelerator no more than its memory
holds, evicting (and closing) the least recently used; a load that fails beside held models frees them and is
tried once more."""

from percept.predictor import BasePredictor, ModelInfo
from workers.model_cache import ModelCache, ModelSource

GiB = 1024**3
closed: list[str] = []
refuse_while_held: dict[str, bool] = {}


class GpuModel(BasePredictor):
    """A model of `version` GiB on a 10 GiB GPU ("cuda:0"), or on the CPU for versions that start with "cpu"."""

    def __init__(self, artifact: bytes, name: str, version: str) -> None:
        super().__init__()
        self.name, self.version = name, version

    def load(self) -> ModelInfo:
        if refuse_while_held.pop(self.name, False):
            raise RuntimeError("CUDA out of memory")
        if self.version.startswith("cpu"):
            return ModelInfo(self.name, self.version, None, "cpu", memory_bytes=int(self.version[3:]) * GiB)
        return ModelInfo(self.name, self.version, None, "cuda:0", memory_bytes=int(self.version) * GiB,
                         device_memory_bytes=10 * GiB)

    def close(self) -> None:
        closed.append(self.name)


def source(name: str, gib: str):
    return lambda: ModelSource(name, gib, "tests.workers.test_model_cache:GpuModel", artifact=b"")


def test_models_are_evicted_least_recently_used_first_when_the_gpu_is_full():
    closed.clear()
    cache = ModelCache(max_models=8)
    cache.get("a", source("a", "4"))
    cache.get("b", source("b", "4"))
    assert cache.get("a", source("a", "4")).load_ms == 0.0  # warm, and now the most recently used
    cache.get("c", source("c", "4"))  # 12 GiB > 9 GiB (90% of 10): b goes
    assert cache.keys() == ["a", "c"] and closed == ["b"]


def test_models_on_the_cpu_are_bounded_by_count_only():
    closed.clear()
    cache = ModelCache(max_models=2)
    for name in ("x", "y"):
        cache.get(name, source(name, "cpu50"))
    cache.get("g", source("g", "4"))  # a GPU model does not make room among CPU ones beyond the count
    assert cache.keys() == ["y", "g"] and closed == ["x"]


def test_a_load_that_fails_beside_held_models_frees_them_and_tries_again():
    closed.clear()
    cache = ModelCache(max_models=8)
    cache.get("a", source("a", "2"))
    refuse_while_held["big"] = True  # the first attempt fails as a full GPU would
    loaded = cache.get("big", source("big", "8"))
    assert loaded.info.memory_bytes == 8 * GiB
    assert cache.keys() == ["big"] and closed == ["a"]
