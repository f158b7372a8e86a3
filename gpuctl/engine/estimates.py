"""How long things take, learnt from what they took before: resumes, loads, requests.

Estimates drive two choices and one promise: which paused GPU to wake (the fastest past
resumer), whether a long queue is worth waking another GPU for (expected wait > wake time),
and the wait a queued request is told. With no history yet they fall back to the durations
SURF is known for (a resume takes 1–4 minutes).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

__all__ = ["DEFAULT_LOAD_SECONDS", "DEFAULT_PAUSE_SECONDS", "DEFAULT_RESUME_SECONDS",
           "DEFAULT_SERVICE_SECONDS", "Estimator"]

DEFAULT_RESUME_SECONDS = 180.0
DEFAULT_PAUSE_SECONDS = 60.0
DEFAULT_LOAD_SECONDS = 15.0
DEFAULT_SERVICE_SECONDS = 20.0
_KEEP = 20
_ALPHA = 0.2  # weight of the newest request in the moving average of service time


class Estimator:
    def __init__(
        self,
        resumes: Mapping[str, Iterable[tuple[float, bool]]] | None = None,
        loads: Mapping[str, Iterable[float]] | None = None,
    ) -> None:
        self._resumes: dict[str, deque[float]] = {}
        self._failures: dict[str, int] = {}
        for gpu_id, history in (resumes or {}).items():
            for seconds, ok in history:
                self.record_resume(gpu_id, seconds, ok=ok)
        self._loads: dict[str, deque[float]] = {
            model: deque(times, maxlen=_KEEP) for model, times in (loads or {}).items()
        }
        self._service: dict[str, float] = {}
        self._service_all: float | None = None
        self._pauses: dict[str, deque[float]] = {}

    def record_resume(self, gpu_id: str, seconds: float, *, ok: bool) -> None:
        if ok:
            self._resumes.setdefault(gpu_id, deque(maxlen=_KEEP)).append(seconds)
            self._failures[gpu_id] = 0
        else:
            self._failures[gpu_id] = self._failures.get(gpu_id, 0) + 1

    def record_pause(self, gpu_id: str, seconds: float) -> None:
        """A pause of ``gpu_id`` took ``seconds`` from asking to the cloud saying paused."""
        self._pauses.setdefault(gpu_id, deque(maxlen=_KEEP)).append(seconds)

    def pause_seconds(self, gpu_id: str) -> float:
        """Expected seconds from asking for a pause to the cloud saying paused."""
        own = self._pauses.get(gpu_id)
        if own:
            return sum(own) / len(own)
        every = [s for times in self._pauses.values() for s in times]
        return sum(every) / len(every) if every else DEFAULT_PAUSE_SECONDS

    def record_load(self, model: str, seconds: float) -> None:
        self._loads.setdefault(model, deque(maxlen=_KEEP)).append(seconds)

    def record_service(self, model: str, seconds: float) -> None:
        old = self._service.get(model)
        self._service[model] = seconds if old is None else old + _ALPHA * (seconds - old)
        everything = self._service_all
        self._service_all = (
            seconds if everything is None else everything + _ALPHA * (seconds - everything)
        )

    def resume_seconds(self, gpu_id: str) -> float:
        """Expected seconds from a resume request to Ollama answering on this GPU."""
        own = self._resumes.get(gpu_id)
        if own:
            return sum(own) / len(own)
        every = [s for times in self._resumes.values() for s in times]
        return sum(every) / len(every) if every else DEFAULT_RESUME_SECONDS

    def known_resume(self, gpu_id: str) -> bool:
        return bool(self._resumes.get(gpu_id))

    def recent_failures(self, gpu_id: str) -> int:
        return self._failures.get(gpu_id, 0)

    def load_seconds(self, model: str) -> float:
        times = self._loads.get(model)
        return sum(times) / len(times) if times else DEFAULT_LOAD_SECONDS

    def service_seconds(self, model: str) -> float:
        value = self._service.get(model, self._service_all)
        return DEFAULT_SERVICE_SECONDS if value is None else value

    def queue_wait(self, model: str, position: int, serving_slots: int) -> float:
        """Seconds until the ``position``-th waiter gets one of ``serving_slots`` slots."""
        if serving_slots <= 0:
            return float(position) * self.service_seconds(model)
        rounds = (position + serving_slots - 1) // serving_slots
        return rounds * self.service_seconds(model)
