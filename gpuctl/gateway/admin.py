"""The admin API of the service gpuctl replaces, same shapes, plus ``/metrics``.

``/health`` needs no key; ``/gpu/discover`` and ``/gpu/{id}/status`` need any key;
``/gpu/{id}/resume``, ``/gpu/{id}/pause``, ``/gpu/discover?refresh=1`` and
``/admin/requests`` (the request log, for ``gpuctl simulate --url``) need an admin key (the
app checks roles); ``/admin/usage`` needs any key and shows a user key only its own rows.
``/gpu/discover`` answers from the engine's fleet view, which the engine's loop keeps fresh
(every page of the cloud each poll): a key holder asking in a loop costs the cloud API
nothing; an admin may ask for a fresh read with ``?refresh=1``.
Resume and pause are the very ``Engine.wake`` / ``Engine.pause`` calls of ``gpuctl resume``
and ``gpuctl pause``; an action the state does not allow comes back as a 4xx with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from quart import Blueprint, Response, request

from gpuctl.engine.api import ActionResult, GpuView
from gpuctl.engine.requestlog import MAX_ROWS
from gpuctl.errors import CloudError
from gpuctl.gateway.metrics import CONTENT_TYPE
from gpuctl.gateway.routes import gateway, json_response

__all__ = ["blueprint", "gpu_summary"]

blueprint = Blueprint("admin", __name__)


def gpu_summary(gpu: GpuView) -> dict[str, Any]:
    """One GPU in the old service's keys, followed by gpuctl's richer ones.

    Every ``GpuView`` field is there under its own name too (``state``, ``ip``, ``size``,
    ``fqdn``, ``estimated_resume_seconds`` ...), so a client can rebuild the view with
    ``GpuView.model_validate`` (``gpuctl status --demo`` does) and print what ``gpuctl
    status`` prints.
    """
    summary: dict[str, Any] = {
        "id": gpu.id,
        "name": gpu.name,
        "status": gpu.state.value,
        "ip_address": gpu.ip,
        "can_resume": gpu.can_resume,
        "can_pause": gpu.can_pause,
        "flavor": gpu.flavor,
        "cloud_status": gpu.cloud_status,
        "models": gpu.models,
        "loaded": gpu.loaded,
        "slots": gpu.slots,
        "slots_in_use": gpu.slots_in_use,
        "queued": gpu.queued,
        "leases": [lease.model_dump() for lease in gpu.leases],
        "last_error": gpu.last_error,
    }
    for key, value in gpu.model_dump(mode="json").items():
        summary.setdefault(key, value)
    return summary


@blueprint.route("/health", methods=["GET", "HEAD"])
async def health() -> Response:
    return json_response({"status": "healthy", "service": "gpuctl"})


def refresh_asked(args: Mapping[str, str]) -> bool:
    """``/gpu/discover?refresh=1``: an admin asks for a fresh read of the cloud. Takes the
    query as an argument so the key check can ask before any framework has parsed it."""
    return _truthy(args.get("refresh"))


@blueprint.route("/gpu/discover", methods=["GET"])
async def discover() -> Response:
    engine = gateway().engine
    payload: dict[str, Any] = {}
    error = engine.refresh_error()
    if refresh_asked(request.args):
        try:
            await engine.refresh(probe=False)
            error = None
        except CloudError as exc:
            error = str(exc)
    if error is not None:
        # The cloud API is down: answer with what the engine last saw, and say so.
        payload["warning"] = f"cloud API unavailable, showing the last known fleet: {error}"
    gpus = engine.gpus()
    payload = {"discovered_gpus": len(gpus), "gpus": [gpu_summary(g) for g in gpus], **payload}
    return json_response(payload)


@blueprint.route("/gpu/<ref>/status", methods=["GET"])
async def status(ref: str) -> Response:
    gpu = gateway().engine.gpu(ref)
    return json_response({"gpu_id": gpu.id, **gpu_summary(gpu)})


def _action(result: ActionResult) -> Response:
    gpu = result.gpu
    return json_response({
        "success": result.success,
        "message": result.message,
        "gpu_id": gpu.id,
        "name": gpu.name,
        "status": gpu.state.value,
        "elapsed_seconds": round(result.elapsed_seconds, 3),
    })


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


def _wait_flag() -> bool:
    return _truthy(request.args.get("wait"))


@blueprint.route("/gpu/<ref>/resume", methods=["POST"])
async def resume(ref: str) -> Response:
    timeout = request.args.get("timeout", type=float)
    result = await gateway().engine.wake(ref, wait=_wait_flag(), timeout=timeout)
    return _action(result)


@blueprint.route("/gpu/<ref>/pause", methods=["POST"])
async def pause(ref: str) -> Response:
    result = await gateway().engine.pause(ref, wait=_wait_flag())
    return _action(result)


@blueprint.route("/admin/usage", methods=["GET"])
async def usage() -> Response:
    """The usage report (``gpuctl usage --url``): an admin key sees every user, a user key
    their own rows and the fleet's totals."""
    gw = gateway()
    key = gw.auth.check(request.headers.get("Authorization"))
    report = await gw.engine.usage(
        since=request.args.get("since") or "7d", until=request.args.get("until") or None,
        by=request.args.get("by") or "user", user=None if key.is_admin else key.name,
    )
    return json_response(report.model_dump(mode="json"))


@blueprint.route("/admin/requests", methods=["GET"])
async def requests() -> Response:
    """The served requests of ``[since, until)`` and the learnt fleet (``gpuctl simulate
    --url``), at most ``limit`` rows (200,000 at most; ``truncated`` says when cut). Admin
    keys only (the app checks): it names every user."""
    log = await gateway().engine.request_log(
        since=request.args.get("since") or "7d", until=request.args.get("until") or None,
        limit=request.args.get("limit", type=int) or MAX_ROWS,
    )
    return json_response(log.model_dump(mode="json"))


@blueprint.route("/metrics", methods=["GET"])
async def metrics() -> Response:
    return Response(gateway().metrics.render(), content_type=CONTENT_TYPE)
