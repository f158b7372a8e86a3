"""A study of settings: replay one workload under each, mark the Pareto front, recommend one.

This is what ``gpuctl simulate`` runs (the command only parses flags and renders): the grid
of settings (every ``--set KEY=V1,V2`` a dimension, ``--policy`` one more), the current
config as the baseline, one ``replay`` per setting, and a verdict. A setting is on the
Pareto front when no other is at least as cheap with at most as many waits for a wake and
better in one. The recommendation is the cheapest setting on the front that makes no more
requests wait for a wake than the current config does; what switching would have saved is
the difference in GPU-hours (and credits, when ``cost.credits_per_gpu_hour`` is known).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from gpuctl.config import SECTIONS, Config
from gpuctl.engine.requestlog import FleetGpu, learned_fleet
from gpuctl.errors import ConfigError, UsageError
from gpuctl.sim.replay import MONDAY, FleetSpec, GpuSpec, Outcome, describe, replay
from gpuctl.sim.workload import Request
from gpuctl.store import Store

__all__ = [
    "SettingResult",
    "StudyResult",
    "fleet_from_learnt",
    "fleet_from_store",
    "parse_sets",
    "run_study",
    "settings_grid",
]

#: Most settings one study replays (a grid grows fast; each replay takes seconds).
MAX_SETTINGS = 64


class SettingResult(BaseModel):
    """One setting's figures over the window."""

    label: str
    settings: dict[str, Any]
    current: bool
    gpu_hours: float
    credits: float | None
    always_on_gpu_hours: float
    optimum_gpu_hours: float
    over_optimum: float
    requests: int
    refused: int
    waited_for_wake: int
    wait_median_s: float
    wait_p90_s: float
    wait_max_s: float
    resumes: int
    pareto: bool = False
    recommended: bool = False


class StudyResult(BaseModel):
    """Every setting of a study, and the verdict."""

    source: str
    window_hours: float
    requests: int
    gpus: int
    notes: list[str]
    settings: list[SettingResult]
    recommended: str
    saved_gpu_hours: float
    saved_credits: float | None
    verdict: str


def parse_sets(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["timing.reservation_minutes=2,5"]`` → ``[("timing.reservation_minutes", ["2","5"])]``,
    refusing unknown keys (``UsageError``)."""
    parsed: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        section, _, name = key.partition(".")
        if not sep or section not in SECTIONS or name not in SECTIONS[section].model_fields:
            raise UsageError(
                f"--set {item!r}: expected KEY=V1,V2 with a config key such as "
                "timing.reservation_minutes",
            )
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not options:
            raise UsageError(f"--set {item!r}: no values")
        parsed.append((key, options))
    return parsed


def settings_grid(
    sets: Sequence[tuple[str, list[str]]], policies: Sequence[str]
) -> list[dict[str, str]]:
    """Every combination of the ``--set`` values and the policies, as dotted-key overrides."""
    dims = list(sets)
    if policies:
        dims.append(("timing.pause_policy", list(policies)))
    grid = [dict(zip([k for k, _ in dims], combo, strict=True))
            for combo in itertools.product(*(v for _, v in dims))]
    if len(grid) > MAX_SETTINGS:
        raise UsageError(f"{len(grid)} settings to replay; at most {MAX_SETTINGS} at once")
    return grid


def apply(base: Config, overrides: dict[str, str]) -> Config:
    """``base`` with dotted-key ``overrides`` (strings, converted and checked by pydantic)."""
    data = base.model_dump()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise ConfigError(f"--set {where}: {problem['msg'].lower()} "
                          f"(got {problem.get('input')!r})") from None


def fleet_from_store(
    store: Store, *, resume_s: float | None = None, pause_s: float | None = None
) -> FleetSpec | None:
    """The real fleet as the store knows it: each GPU seen awake, its models, its mean
    learnt resume time (less a 5 s Ollama start); ``None`` when no GPU was ever seen."""
    return fleet_from_learnt(learned_fleet(store), resume_s=resume_s, pause_s=pause_s)


def fleet_from_learnt(
    known: Sequence[FleetGpu], *, resume_s: float | None = None, pause_s: float | None = None
) -> FleetSpec | None:
    """The fleet of ``known`` (the store's, or a gateway's ``/admin/requests``); ``None``
    when it is empty."""
    if not known:
        return None
    gpus = []
    for gpu in known:
        times = gpu.resume_seconds
        learnt = sum(times) / len(times) - 5.0 if times else 120.0
        gpus.append(GpuSpec(
            gpu.id, tuple(gpu.models), resume_s if resume_s is not None else max(1.0, learnt),
            pause_s if pause_s is not None else 60.0,
        ))
    return FleetSpec(tuple(gpus))


def _label(overrides: dict[str, str]) -> str:
    if not overrides:
        return "current config"
    parts = []
    for key, value in overrides.items():
        short = {"timing.reservation_minutes": "lease", "timing.pause_policy": "policy",
                 "timing.max_idle_minutes": "max idle"}.get(key, key)
        suffix = " min" if short == "lease" else ""
        parts.append(f"{short} {value}{suffix}")
    return ", ".join(parts)


async def run_study(
    base: Config, requests: Sequence[Request], fleet: FleetSpec, grid: Sequence[dict[str, str]],
    *, source: str, history: Sequence[Request] = (), notes: Sequence[str] = (),
    credits_per_gpu_hour: float | None = None, start_wall: float = MONDAY,
    window_s: float | None = None,
) -> StudyResult:
    """Replay ``requests`` under the current config and each setting of ``grid``."""
    entries: list[tuple[dict[str, str], Config, bool]] = []
    for overrides in grid:
        config = apply(base, overrides)
        is_current = config == base and not any(current for *_, current in entries)
        entries.append((overrides, config, is_current))
    if not any(current for *_, current in entries):
        entries.insert(0, ({}, base, True))
    results: list[SettingResult] = []
    window_hours = 0.0
    for overrides, config, is_current in entries:
        outcome = await replay(requests, config, fleet, history=history,
                               start_wall=start_wall, window_s=window_s)
        window_hours = outcome.window_hours
        results.append(_result(_label(overrides), overrides, is_current, outcome,
                               credits_per_gpu_hour))
    _mark_front(results)
    current = next(r for r in results if r.current)
    best = _recommend(results, current)
    best.recommended = True
    saved = current.gpu_hours - best.gpu_hours
    saved_credits = (saved * credits_per_gpu_hour) if credits_per_gpu_hour is not None else None
    if best is current:
        verdict = (f"Keep the current config ({current.label}): no setting tried is cheaper "
                   "without more requests waiting for a wake.")
    else:
        money = f" ({saved_credits:,.1f} credits)" if saved_credits is not None else ""
        verdict = (f"Switch to {best.label}: {saved:,.1f} GPU-hours{money} less over the "
                   f"window, with {best.waited_for_wake} requests waiting for a wake instead "
                   f"of {current.waited_for_wake}.")
    return StudyResult(
        source=source, window_hours=window_hours,
        requests=len(requests), gpus=len(fleet.gpus), notes=list(notes), settings=results,
        recommended=best.label, saved_gpu_hours=round(saved, 3),
        saved_credits=None if saved_credits is None else round(saved_credits, 3),
        verdict=verdict,
    )


def _result(label: str, overrides: dict[str, str], current: bool, outcome: Outcome,
            rate: float | None) -> SettingResult:
    figures = describe(outcome)
    return SettingResult(
        label=label, settings=dict(overrides), current=current,
        credits=None if rate is None else round(outcome.gpu_hours * rate, 3),
        always_on_gpu_hours=figures.pop("always_on_gpu_hours"), **figures,
    )


def _mark_front(results: list[SettingResult]) -> None:
    for r in results:
        r.pareto = not any(
            o is not r and o.gpu_hours <= r.gpu_hours and o.waited_for_wake <= r.waited_for_wake
            and (o.gpu_hours < r.gpu_hours or o.waited_for_wake < r.waited_for_wake)
            for o in results
        )


def _recommend(results: list[SettingResult], current: SettingResult) -> SettingResult:
    fits = [r for r in results if r.pareto and r.waited_for_wake <= current.waited_for_wake
            and r.refused <= current.refused]
    best = min(fits, key=lambda r: (r.gpu_hours, r.waited_for_wake), default=current)
    return best if best.gpu_hours < current.gpu_hours else current
