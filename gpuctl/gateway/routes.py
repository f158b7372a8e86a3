"""The Ollama and OpenAI routes that are not inference: fleet listings and model management.

``/api/tags``, ``/api/ps`` and ``/v1/models`` answer for the whole fleet from what the
engine knows and never wake a GPU (listing models woke GPUs in the service gpuctl
replaces). ``/api/show`` asks a running GPU that has the model, and remembers the answer so
a sleeping fleet can still describe its models. ``pull``, ``push``, ``create``, ``copy``,
``delete`` and blobs change nodes, so they are admin-only (the app checks the role) and go
to the GPUs the engine picks (``Engine.management_targets``: every running GPU, or the ones
named in ``X-Gpuctl-Gpu``, woken if need be). What is asked and remembered is the engine's
business; this module only relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from quart import Blueprint, Response, current_app, request

from gpuctl.engine.api import GpuView, ModelView
from gpuctl.errors import GpuctlError, NodeError, UsageError
from gpuctl.gateway.context import Gateway
from gpuctl.gateway.jsonbody import BadJson, load_object

__all__ = ["OLLAMA_VERSION", "blueprint", "gateway", "json_response"]

#: The Ollama API level the gateway speaks (clients gate features on /api/version).
OLLAMA_VERSION = "0.12.6"

blueprint = Blueprint("ollama", __name__)


def gateway() -> Gateway:
    gw: Gateway = current_app.config["GPUCTL_GATEWAY"]
    return gw


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status,
                    content_type="application/json; charset=utf-8")


def _error(message: str, status: int) -> Response:
    return json_response({"error": message}, status)


async def _raw() -> bytes:
    data = await request.get_data(as_text=False)
    return data.encode() if isinstance(data, str) else data


async def _body() -> dict[str, Any]:
    try:
        return load_object(await _raw())
    except BadJson as exc:
        raise UsageError(str(exc)) from None


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model:
        raise UsageError("model is required")
    return model


def _url(gpu: GpuView, path: str) -> str:
    """``path`` on the GPU's Ollama; the engine gives a ready or targeted GPU its URL."""
    if not gpu.base_url:
        raise NodeError(f"{gpu.name} has no address yet")
    return f"{gpu.base_url}{path}"


# -- fleet listings -------------------------------------------------------------------------


@blueprint.route("/api/version", methods=["GET", "HEAD"])
async def version() -> Response:
    return json_response({"version": OLLAMA_VERSION})


@blueprint.route("/api/tags", methods=["GET", "HEAD"])
async def tags() -> Response:
    models = [_tag(m) for m in gateway().engine.models()]
    return json_response({"models": models})


def _tag(model: ModelView) -> dict[str, Any]:
    """One ``/api/tags`` entry; an unknown ``modified_at`` is left out, not sent empty
    (the ollama client rejects an empty timestamp)."""
    entry = model.model_dump()
    if not entry.get("modified_at"):
        entry.pop("modified_at", None)
    return entry


@blueprint.route("/api/ps", methods=["GET"])
async def ps() -> Response:
    return json_response({"models": gateway().engine.loaded()})


@blueprint.route("/v1/models", methods=["GET"])
async def openai_models() -> Response:
    data = [_openai_model(m.name) for m in gateway().engine.models()]
    return json_response({"object": "list", "data": data or None})


@blueprint.route("/v1/models/<path:model>", methods=["GET"])
async def openai_model(model: str) -> Response:
    names = {m.name for m in gateway().engine.models()}
    wanted = model if ":" in model else f"{model}:latest"
    if model not in names and wanted not in names:
        return json_response({"error": {"message": f"model '{model}' not found",
                                "type": "not_found_error", "param": None, "code": None}}, 404)
    return json_response(_openai_model(model))


def _openai_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "library"}


# -- /api/show ----------------------------------------------------------------------------


@blueprint.route("/api/show", methods=["POST"])
async def show() -> Response:
    gw = gateway()
    body = await _body()
    model = _model_of(body)
    ready = [g for g in gw.engine.gpus_with_model(model) if g.state.ready and g.base_url]
    for gpu in ready:
        try:
            upstream = await gw.http.post(_url(gpu, "/api/show"), json=body,
                                          headers=gw.node_headers_dict())
        except httpx.HTTPError:
            continue
        if upstream.status_code == 200:
            gw.engine.remember_show(model, upstream.content)
        return Response(upstream.content, status=upstream.status_code,
                        content_type=upstream.headers.get("content-type", "application/json"),
                        headers={"X-Gpuctl-Gpu": gpu.name})
    shown = gw.engine.shown(model)
    if shown is not None:
        return Response(shown, content_type="application/json; charset=utf-8")
    return _error(f"model '{model}' not found", 404)


# -- management: admin only (checked by the app) -------------------------------------------


async def _targets(gw: Gateway, model: str | None = None) -> list[GpuView]:
    """The engine's GPUs for this call; ``X-Gpuctl-Gpu`` names them (comma-separated)."""
    named = request.headers.get("X-Gpuctl-Gpu", "")
    refs = [r.strip() for r in named.split(",") if r.strip()]
    return await gw.engine.management_targets(model, refs)


async def _progress_lines(gw: Gateway, gpu: GpuView, path: str, body: dict[str, Any],
                          out: asyncio.Queue[tuple[GpuView, bytes | None, str | None]]) -> None:
    try:
        async with gw.http.stream("POST", _url(gpu, path), json=body,
                                  headers=gw.node_headers_dict()) as upstream:
            if upstream.status_code != 200:
                text = (await upstream.aread()).decode("utf-8", "replace")
                await out.put((gpu, None, _upstream_error(text, upstream.status_code)))
                return
            async for line in upstream.aiter_lines():
                if line.strip():
                    await out.put((gpu, line.encode(), None))
    except (httpx.HTTPError, GpuctlError) as exc:
        await out.put((gpu, None, str(exc) or type(exc).__name__))
        return
    await out.put((gpu, None, None))


def _upstream_error(text: str, status: int) -> str:
    try:
        value = json.loads(text)
        if isinstance(value, dict) and value.get("error"):
            return str(value["error"])
    except ValueError:
        pass
    return text.strip() or f"status {status}"


async def _fan_out_progress(kind: str) -> Response:
    gw = gateway()
    body = await _body()
    model = _model_of(body)
    stream = body.get("stream", True) is not False
    targets = await _targets(gw, model if kind != "pull" else None)
    queue: asyncio.Queue[tuple[GpuView, bytes | None, str | None]] = asyncio.Queue()
    tasks = [asyncio.ensure_future(_progress_lines(gw, g, f"/api/{kind}", body, queue))
             for g in targets]
    single = len(targets) == 1

    async def lines() -> AsyncIterator[tuple[GpuView, bytes | None, str | None]]:
        pending = len(tasks)
        try:
            while pending:
                item = await queue.get()
                if item[1] is None:
                    pending -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()

    def tagged(gpu: GpuView, line: bytes) -> bytes:
        if single:
            return line + b"\n"
        try:
            obj = json.loads(line)
        except ValueError:
            return line + b"\n"
        if isinstance(obj, dict):
            if obj.get("status") == "success":
                obj["status"] = f"success on {gpu.name}"
            obj["gpu"] = gpu.name
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    async def streamed() -> AsyncIterator[bytes]:
        errors: list[str] = []
        async for gpu, line, error in lines():
            if line is not None:
                yield tagged(gpu, line)
            elif error is not None:
                errors.append(f"{gpu.name}: {error}")
        if errors:
            yield json.dumps({"error": "; ".join(errors)}).encode() + b"\n"
        elif not single:
            yield b'{"status":"success"}\n'
        if kind == "pull":
            await _refresh(gw)

    if stream:
        headers = {"X-Gpuctl-Gpu": ",".join(g.name for g in targets)}
        return Response(streamed(), content_type="application/x-ndjson", headers=headers)
    last: dict[str, Any] = {}
    errors: list[str] = []
    async for gpu, line, error in lines():
        if line is not None:
            last = json.loads(line)
        elif error is not None:
            errors.append(f"{gpu.name}: {error}")
    if kind == "pull":
        await _refresh(gw)
    if errors:
        return _error("; ".join(errors), 500)
    return json_response(last or {"status": "success"})


async def _refresh(gw: Gateway) -> None:
    """Let the engine see the new model now, not at its next poll."""
    with contextlib.suppress(GpuctlError):
        await gw.engine.refresh(probe=True)


@blueprint.route("/api/pull", methods=["POST"])
async def pull() -> Response:
    return await _fan_out_progress("pull")


@blueprint.route("/api/push", methods=["POST"])
async def push() -> Response:
    return await _fan_out_progress("push")


@blueprint.route("/api/create", methods=["POST"])
async def create() -> Response:
    return await _fan_out_progress("create")


async def _fan_out_plain(method: str, path: str, content: bytes,
                         model: str | None = None) -> Response:
    """Send one request to every target GPU; answer with the worst status seen."""
    gw = gateway()
    targets = await _targets(gw, model)
    results: list[tuple[GpuView, httpx.Response | None, str]] = []
    for gpu in targets:
        try:
            upstream = await gw.http.request(method, _url(gpu, path),
                                             content=content, headers=gw.node_headers_dict())
            results.append((gpu, upstream, ""))
        except httpx.HTTPError as exc:
            results.append((gpu, None, str(exc) or type(exc).__name__))
    ok = [r for _, r, _ in results if r is not None and r.status_code < 400]
    # A GPU that lacks the model (404) is no failure when another one did the work.
    failures = [(g, r, e) for g, r, e in results if r is None or (r.status_code >= 400
                and not (ok and r.status_code == 404))]
    names = {"X-Gpuctl-Gpu": ",".join(g.name for g in targets)}
    if not failures:
        first = ok[0]
        return Response(first.content, status=first.status_code, headers=names,
                        content_type=first.headers.get("content-type", "application/json"))
    gpu, failed, error = failures[0]
    if failed is None:
        raise NodeError(f"{gpu.name}: {error}")
    return Response(failed.content, status=failed.status_code, headers=names,
                    content_type=failed.headers.get("content-type", "application/json"))


@blueprint.route("/api/copy", methods=["POST"])
async def copy() -> Response:
    body = await _body()
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise UsageError("source is required")
    response = await _fan_out_plain("POST", "/api/copy", await _raw(), source)
    if response.status_code < 400:
        await _refresh(gateway())
    return response


@blueprint.route("/api/delete", methods=["DELETE"])
async def delete() -> Response:
    model = _model_of(await _body())
    response = await _fan_out_plain("DELETE", "/api/delete", await _raw(), model)
    if response.status_code < 400:
        await _refresh(gateway())
    return response


@blueprint.route("/api/blobs/<digest>", methods=["HEAD", "POST"])
async def blobs(digest: str) -> Response:
    return await _fan_out_plain(request.method, f"/api/blobs/{digest}",
                                await _raw())
