"""Which GPUs have which model: on disk anywhere in the fleet, and ready to serve right now.

Two questions come up on every slow-path request and must not scan the fleet: "does any GPU
have model M at all?" (else: Ollama's 404, or wake a GPU never seen to learn its models) and
"how many ready GPUs serve M?" (the queue's wait estimate). The catalog keeps both answers
up to date as model lists and readiness change. A model nobody has is answered with Ollama's
own 404 (``not_found``).
"""

from __future__ import annotations

from collections.abc import Iterable

from gpuctl.engine.api import ModelView
from gpuctl.engine.fleet import Gpu, normalize_model
from gpuctl.errors import ModelNotFound

__all__ = ["ModelCatalog", "not_found"]


def not_found(model: str) -> ModelNotFound:
    """Ollama's own words for a model it does not have, so clients recognise them."""
    return ModelNotFound(f'model "{model}" not found, try pulling it first')


class ModelCatalog:
    def __init__(self, slots: int) -> None:
        #: Slots per GPU (the same on every GPU of the fleet).
        self.slots = slots
        self._holders: dict[str, set[str]] = {}
        self._ready: dict[str, int] = {}

    def known(self, model: str) -> bool:
        """Some GPU in the fleet has ``model`` (as last seen)."""
        return model in self._holders

    def holders(self, model: str) -> set[str]:
        return self._holders.get(model, set())

    def ready_gpus(self, model: str) -> int:
        """How many ready GPUs have ``model``."""
        return self._ready.get(model, 0)

    def serving_slots(self, model: str) -> int:
        """How many slots the ready GPUs with ``model`` have between them."""
        return self._ready.get(model, 0) * self.slots

    def set_models(self, gpu: Gpu, views: Iterable[ModelView]) -> bool:
        """Give ``gpu`` the model list ``views``; True when it changed."""
        models = {normalize_model(v.name or v.model): v for v in views}
        old = gpu.models
        if old is not None and models == old:
            return False
        for model in old or {}:
            if model not in models:
                self._release(model, gpu.id)
        for model in models:
            self._holders.setdefault(model, set()).add(gpu.id)
        gpu.models = models
        return True

    def set_ready(self, gpu: Gpu, ready: bool) -> None:
        """Count ``gpu``'s models as ready (or not); cheap when nothing changed."""
        models = gpu.models if ready else None
        if gpu.counted is models:
            return
        for model in gpu.counted or {}:
            left = self._ready[model] - 1
            if left:
                self._ready[model] = left
            else:
                del self._ready[model]
        for model in models or {}:
            self._ready[model] = self._ready.get(model, 0) + 1
        gpu.counted = models

    def forget(self, gpu: Gpu) -> None:
        """``gpu`` left the fleet."""
        self.set_ready(gpu, False)
        for model in gpu.models or {}:
            self._release(model, gpu.id)

    def _release(self, model: str, gpu_id: str) -> None:
        holders = self._holders.get(model)
        if holders is not None:
            holders.discard(gpu_id)
            if not holders:
                del self._holders[model]
