"""The HTTP API and web page of `diffsr serve` (FastAPI on Starlette, served by uvicorn).

    app = create_app(ServerConfig(model_dir=Path("models")))   # then: uvicorn.run(app)

Uploads are decoded on a thread (content sniffed by `diffsr.io.decode_image`, with the same
pixel limit as the CLI) before a job is accepted, so a bad file gets its 4xx at once rather than
a failed job. Progress reaches the event stream through `call_soon_threadsafe` from the workers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import shutil
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import parse_qs

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from diffsr import __version__
from diffsr.io import DEFAULT_MAX_PIXELS, ImageError, decode_image
from diffsr.registry import list_methods
from diffsr.server.jobs import FORMAT_MEDIA_TYPES, FORMAT_SUFFIXES, Job, JobManager, JobState, QueueFull
from diffsr.server.policy import OUTPUT_FORMATS, FieldError, ModelCatalogue, method_schema, parse_options

TOKEN_COOKIE = "diffsr_token"
STATIC = Path(__file__).with_name("static")


@dataclass(frozen=True)
class ServerConfig:
    workers: int = 1
    max_queue: int = 8
    """Jobs that may wait for a worker; one more gets 503 with Retry-After."""
    token: str | None = None
    max_upload_bytes: int = 64 * 1024 * 1024
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    result_ttl: float = 3600.0
    """Seconds a finished job's result is kept before its files are deleted."""
    model_dir: Path | None = None
    device: str = "auto"
    max_models: int = 2
    work_dir: Path | None = None
    """Where job files live; default a fresh temporary folder, removed at shutdown."""


# ------------------------------------------------------------------------------ response models


class JobAccepted(BaseModel):
    id: str
    status_url: str
    events_url: str


class ResultInfo(BaseModel):
    url: str
    format: str
    media_type: str
    width: int
    height: int


class JobStatus(BaseModel):
    id: str
    state: str
    """queued, running, done, failed or cancelled."""
    method: str
    options: dict[str, Any]
    progress: float
    """0..1 of the current stage."""
    stage: str | None
    done: int
    total: int
    queue_position: int | None
    error: str | None
    cancel_requested: bool
    input: dict[str, Any]
    result: ResultInfo | None
    created: float
    started: float | None
    finished: float | None
    expires: float | None


def create_app(config: ServerConfig = ServerConfig()) -> FastAPI:
    own_work_dir = config.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="diffsr-serve-")) if own_work_dir else Path(config.work_dir)
    catalogue = ModelCatalogue(config.model_dir)
    watchers: dict[str, set[asyncio.Event]] = {}
    loop_box: list[asyncio.AbstractEventLoop] = []

    def wake(job_id: str) -> None:
        for event in watchers.get(job_id, ()):
            event.set()

    def on_change(job_id: str) -> None:  # called from worker threads
        if loop_box and not loop_box[0].is_closed():
            loop_box[0].call_soon_threadsafe(wake, job_id)

    manager = JobManager(work_dir, config.workers, config.max_queue, config.result_ttl, config.max_models, on_change)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop_box.append(asyncio.get_running_loop())
        manager.start()
        try:
            yield
        finally:
            await run_in_threadpool(manager.close)
            loop_box.clear()
            if own_work_dir:
                shutil.rmtree(work_dir, ignore_errors=True)

    app = FastAPI(
        title="diffsr",
        version=__version__,
        description="Image super-resolution jobs: upload an image with a method and its options, follow the job, "
        "fetch the result. Methods and their options come from diffsr's registry (`GET /api/methods`).",
        lifespan=lifespan,
    )
    app.state.manager = manager
    app.state.config = config
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    if config.token:
        app.add_middleware(TokenGuard, token=config.token)

    def status(job: Job) -> JobStatus:
        result = None
        if job.state == JobState.DONE and job.result_format:
            result = ResultInfo(
                url=f"/api/jobs/{job.id}/result", format=job.result_format,
                media_type=FORMAT_MEDIA_TYPES[job.result_format], width=job.result_width or 0, height=job.result_height or 0,
            )
        return JobStatus(
            id=job.id, state=job.state.value, method=job.method,
            options=job.shown_options | {"output_format": job.output_format.lower()},
            progress=round(job.progress, 4), stage=job.stage, done=job.done, total=job.total,
            queue_position=manager.queue_position(job), error=job.error, cancel_requested=job.cancel_requested,
            input={"name": job.input_name, "format": job.input_format, "width": job.input_width, "height": job.input_height,
                   "url": f"/api/jobs/{job.id}/input"},
            result=result, created=job.created, started=job.started, finished=job.finished,
            expires=job.finished + config.result_ttl if job.finished else None,
        )

    def find(job_id: str) -> Job:
        job = manager.get(job_id)
        if job is None:
            if manager.is_expired(job_id):
                raise HTTPException(410, f"job {job_id} has expired or was deleted; its files are gone")
            raise HTTPException(404, f"no job {job_id}")
        return job

    # ------------------------------------------------------------------------------ routes

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/methods", summary="Methods and their options (types, ranges, defaults)")
    async def methods() -> dict[str, Any]:
        return {
            "methods": [method_schema(m, catalogue) for m in list_methods()],
            "output_formats": list(OUTPUT_FORMATS),
            "limits": {"max_upload_bytes": config.max_upload_bytes, "max_pixels": config.max_pixels,
                       "max_queue": config.max_queue, "workers": config.workers, "result_ttl": config.result_ttl},
        }

    @app.get("/api/health", summary="Liveness and queue counts")
    async def health() -> dict[str, Any]:
        return {"ok": True, "version": __version__, "jobs": manager.counts(), "models_loaded": len(manager.models)}

    @app.post(
        "/api/jobs", status_code=202, response_model=JobAccepted, summary="Upload an image and queue a job",
        responses={
            400: {"description": "corrupt or truncated image"}, 413: {"description": "upload or pixel count over the limit"},
            415: {"description": "not an image in a supported format"}, 422: {"description": "unknown option or value out of range"},
            503: {"description": "queue full; retry after the Retry-After header's seconds"},
        },
    )
    async def submit(
        image: UploadFile = File(..., description="the image (PNG, JPEG, WebP, TIFF, BMP, GIF; content is sniffed)"),
        options: str = Form("{}", description='JSON: {"method": "feedforward", "outscale": 2, "tile": 256, ...}'),
    ) -> JSONResponse:
        try:
            request = parse_options(options, catalogue, config.device)
        except FieldError as exc:
            return _field_error(exc)
        name = _display_name(image.filename)
        try:
            manager.check_room()  # no decoding work for a submission that would be refused
            data = await image.read()
            try:
                decoded = await run_in_threadpool(decode_image, data, name, config.max_pixels)
            except ImageError as exc:
                raise HTTPException(_image_status(str(exc)), str(exc)) from None
            job = await run_in_threadpool(
                manager.submit, request.method.name, request.load_values, request.run_values, decoded, data, name,
                request.output_format, request.shown_options,
            )
        except QueueFull as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})
        body = JobAccepted(id=job.id, status_url=f"/api/jobs/{job.id}", events_url=f"/api/jobs/{job.id}/events")
        return JSONResponse(body.model_dump(), status_code=202, headers={"Location": body.status_url})

    @app.get("/api/jobs/{job_id}", response_model=JobStatus, summary="A job's state and progress")
    async def job_status(job_id: str) -> JobStatus:
        return status(find(job_id))

    @app.get(
        "/api/jobs/{job_id}/events", summary="The job's status as server-sent events, until it finishes",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "`event: status` lines with JobStatus JSON"}},
    )
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        find(job_id)
        event = asyncio.Event()
        watchers.setdefault(job_id, set()).add(event)

        async def stream() -> AsyncIterator[str]:
            last = -1
            try:
                while True:
                    event.clear()
                    job = manager.get(job_id)
                    if job is None:
                        yield "event: gone\ndata: {}\n\n"
                        return
                    # read before the status is built: a job that finishes in between then gets one more
                    # round, so its final status is always sent before the stream ends
                    finished = job.state.finished
                    if job.version != last:
                        last = job.version
                        yield f"id: {last}\nevent: status\ndata: {status(job).model_dump_json()}\n\n"
                    if finished:
                        return
                    try:
                        await asyncio.wait_for(event.wait(), timeout=15)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                    if await request.is_disconnected():
                        return
            finally:
                watchers.get(job_id, set()).discard(event)
                if not watchers.get(job_id):
                    watchers.pop(job_id, None)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/jobs/{job_id}/result", summary="The result image (PNG or the input's format)",
             response_class=FileResponse, responses={409: {"description": "the job has not finished successfully"}})
    async def job_result(job_id: str) -> FileResponse:
        job = find(job_id)
        if job.state != JobState.DONE or job.result_path is None or job.result_format is None:
            detail = f"job {job_id} is {job.state.value}" + (f": {job.error}" if job.error else "; no result yet")
            raise HTTPException(409, detail)
        stem = Path(job.input_name).stem or "image"
        return FileResponse(job.result_path, media_type=FORMAT_MEDIA_TYPES[job.result_format],
                            filename=f"{stem}_out.{FORMAT_SUFFIXES[job.result_format]}", content_disposition_type="inline")

    @app.get("/api/jobs/{job_id}/input", summary="The uploaded image, as it was sent", response_class=FileResponse)
    async def job_input(job_id: str) -> FileResponse:
        job = find(job_id)
        return FileResponse(job.input_path, media_type=FORMAT_MEDIA_TYPES.get(job.input_format, "application/octet-stream"))

    @app.delete("/api/jobs/{job_id}", response_model=JobStatus,
                summary="Cancel a queued or running job; delete a finished one and its files")
    async def job_cancel(job_id: str) -> JobStatus:
        find(job_id)
        job = manager.cancel(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return status(job)

    return app


# ------------------------------------------------------------------------------------- helpers


def _field_error(exc: FieldError) -> JSONResponse:
    """422 in FastAPI's own validation shape, so clients read one format."""
    loc = ["body", "options"] if exc.field == "options" else ["body", "options", exc.field]
    return JSONResponse(
        {"detail": [{"loc": loc, "msg": f"{exc.field}: {exc}", "type": "value_error"}]}, status_code=422
    )


def _image_status(message: str) -> int:
    if "over the limit" in message:
        return 413
    if "not an image in a supported format" in message:
        return 415
    return 400


def _display_name(filename: str | None) -> str:
    """The upload's base name for messages and downloads: no folders, no control characters."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = re.sub(r"[\x00-\x1f\x7f\"]", "", base).strip()[:120]
    return base or "upload"


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, {"detail": self._message()})
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"upload over the limit of {self.limit / 2**20:.0f} MiB; send a smaller file or start the server with a larger --max-upload-mb"


class TokenGuard:
    """Every request needs the token: `Authorization: Bearer T`, the cookie the page gets, or `?token=T` once.

    Opening the page as `/?token=T` sets an HttpOnly, SameSite=Strict cookie so the page's own
    requests (fetch, EventSource, <img>) carry it, and redirects to `/` to drop it from the address.
    """

    def __init__(self, app: Any, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given: list[bytes] = []
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given.append(auth[7:].strip())
        cookie = SimpleCookie(headers.get(b"cookie", b"").decode("latin-1"))
        if TOKEN_COOKIE in cookie:
            given.append(cookie[TOKEN_COOKIE].value.encode())
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        from_query = any(hmac.compare_digest(q.encode(), self.token) for q in query)
        if not from_query and not any(hmac.compare_digest(g, self.token) for g in given):
            await _send_json(send, 401, {"detail": "a token is required: send 'Authorization: Bearer TOKEN' or open /?token=TOKEN"},
                             [(b"www-authenticate", b"Bearer")])
            return
        if from_query and scope["method"] == "GET" and scope["path"] == "/":
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, self.token.decode(), httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, body: dict, extra: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
