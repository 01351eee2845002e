"""The job queue behind `diffsr serve`: a bounded queue, a pool of worker threads, loaded models.

Model work runs on worker threads (torch releases the GIL while it computes), never on the
server's event loop. Jobs wait in a queue of bounded length: a full queue refuses new jobs with
an estimate of when to retry, so memory stays bounded by `max_queue` decoded images. Models stay
loaded between jobs, one pipeline per (method, load options), least recently used evicted first.
Cancellation is cooperative: the progress callback raises at the next tile or step.
"""

from __future__ import annotations

import ctypes
import gc
import math
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from diffsr.io import ImageData, encode_image
from diffsr.progress import Progress
from diffsr.registry import get_method
from diffsr.runtime import is_out_of_memory


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


FORMAT_MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "TIFF": "image/tiff", "BMP": "image/bmp", "GIF": "image/gif"}
FORMAT_SUFFIXES = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp", "GIF": "gif"}
WRITABLE_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")


class QueueFull(Exception):
    """Every queue slot is taken; `retry_after` is an estimate in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the job queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ModelLoadError(RuntimeError):
    """The job's model could not be loaded; the message names the model as the request named it."""


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running job at a tile or step boundary."""


@dataclass
class Job:
    id: str
    method: str
    load_values: dict[str, Any]
    run_values: dict[str, Any]
    output_format: str
    """"auto" (the input's format where diffsr can write it, else PNG) or one of WRITABLE_FORMATS."""
    input_name: str
    input_format: str
    input_width: int
    input_height: int
    directory: Path
    image: ImageData | None
    """Decoded input, dropped once the job finishes so a finished job holds no pixels."""
    created: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    stage: str | None = None
    done: int = 0
    total: int = 0
    error: str | None = None
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False
    result_path: Path | None = None
    result_format: str | None = None
    result_width: int | None = None
    result_height: int | None = None
    shown_options: dict[str, Any] = field(default_factory=dict)
    """The options as the request named them, for status answers (no server paths)."""
    version: int = 0
    """Bumped on every change, so watchers can tell whether there is news."""

    @property
    def input_path(self) -> Path:
        return self.directory / ("input." + FORMAT_SUFFIXES.get(self.input_format, "bin"))

    @property
    def progress(self) -> float:
        if self.state == JobState.DONE:
            return 1.0
        return self.done / self.total if self.total else 0.0


class ModelCache:
    """Loaded pipelines by (method, load options), at most `capacity`, least recently used dropped first.

    Each pipeline has a lock so one job at a time runs on it: pipelines may keep per-run state
    (diffusion schedulers do), and two jobs on one model would only split the same cores.
    """

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._entries: OrderedDict[tuple, tuple[Any, threading.Lock]] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(method: str, load_values: dict[str, Any]) -> tuple:
        return (method, tuple(sorted(load_values.items())))

    def get(self, method: str, load_values: dict[str, Any]) -> tuple[Any, threading.Lock]:
        key = self.key(method, load_values)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per key, even when two workers ask at once
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            pipeline = get_method(method).open(**load_values)
            with self._lock:
                entry = self._entries[key] = (pipeline, threading.Lock())
                self._loading.pop(key, None)
                self._evict()
                return entry

    def _evict(self) -> None:
        for key in list(self._entries):
            if len(self._entries) <= self.capacity:
                break
            _, in_use = self._entries[key]
            if not in_use.locked():
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class JobManager:
    """Accepts jobs, runs them on `workers` threads, expires finished ones after `result_ttl` seconds."""

    def __init__(
        self,
        work_dir: Path,
        workers: int = 1,
        max_queue: int = 8,
        result_ttl: float = 3600.0,
        max_models: int = 2,
        on_change: Callable[[str], None] | None = None,
    ):
        self.work_dir = Path(work_dir)
        self.workers = max(1, workers)
        self.max_queue = max(1, max_queue)
        self.result_ttl = result_ttl
        self.models = ModelCache(max_models)
        self.on_change = on_change
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._expired: deque[str] = deque(maxlen=10_000)
        self._expired_set: set[str] = set()
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._mean_seconds = 5.0
        self._running = 0

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"diffsr-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        janitor = threading.Thread(target=self._janitor, name="diffsr-janitor", daemon=True)
        janitor.start()
        self._threads.append(janitor)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running, stop the threads and delete every job's files."""
        with self._cond:
            self._closing = True
            self._stopped.set()
            for job in self._jobs.values():
                job.cancel_requested = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        with self._cond:
            for job in self._jobs.values():
                shutil.rmtree(job.directory, ignore_errors=True)
            self._jobs.clear()
            self._queue.clear()
        self.models.clear()

    # ---------------------------------------------------------------------------------- API

    def submit(
        self,
        method: str,
        load_values: dict[str, Any],
        run_values: dict[str, Any],
        image: ImageData,
        data: bytes,
        input_name: str,
        output_format: str = "auto",
        shown_options: dict[str, Any] | None = None,
    ) -> Job:
        """Queue a decoded image; raises QueueFull when every slot is taken."""
        with self._cond:
            if self._closing:
                raise QueueFull(5)
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self._retry_after())
            job_id = uuid.uuid4().hex
            job = Job(
                id=job_id, method=method, load_values=load_values, run_values=run_values, output_format=output_format,
                input_name=input_name, input_format=image.format or "PNG", input_width=image.width,
                input_height=image.height, directory=self.work_dir / job_id, image=image,
                shown_options=dict(shown_options if shown_options is not None else {**load_values, **run_values}),
            )
            job.directory.mkdir(parents=True)
            job.input_path.write_bytes(data)
            self._jobs[job_id] = job
            self._queue.append(job_id)
            self._cond.notify_all()
        self._changed(job)
        return job

    def check_room(self) -> None:
        """Raise QueueFull now if a submission would be refused, before the upload is decoded."""
        with self._cond:
            if self._closing or len(self._queue) >= self.max_queue:
                raise QueueFull(self._retry_after())

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def is_expired(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self._expired_set

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to start; None once it has left the queue."""
        with self._cond:
            try:
                return self._queue.index(job.id) + 1
            except ValueError:
                return None

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, a running one at its next tile/step; forget a finished one."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.state == JobState.QUEUED:
                self._queue.remove(job_id)
                self._finish(job, JobState.CANCELLED, "cancelled before it started")
            elif job.state == JobState.RUNNING:
                job.cancel_requested = True
                job.version += 1
            else:
                self._forget(job)
        self._changed(job)
        return job

    def counts(self) -> dict[str, int]:
        with self._cond:
            counts = {state.value: 0 for state in JobState}
            for job in self._jobs.values():
                counts[job.state.value] += 1
            return counts

    def expire(self, now: float | None = None) -> int:
        """Delete the files of jobs finished more than result_ttl seconds ago; returns how many."""
        now = time.time() if now is None else now
        with self._cond:
            old = [j for j in self._jobs.values() if j.finished is not None and now - j.finished >= self.result_ttl]
            for job in old:
                self._forget(job)
        for job in old:
            self._changed(job)
        return len(old)

    # ---------------------------------------------------------------------------- internals

    def _forget(self, job: Job) -> None:
        """Remove a finished job and its files (caller holds the lock)."""
        self._jobs.pop(job.id, None)
        shutil.rmtree(job.directory, ignore_errors=True)
        if len(self._expired) == self._expired.maxlen:
            self._expired_set.discard(self._expired[0])
        self._expired.append(job.id)
        self._expired_set.add(job.id)
        job.version += 1

    def _retry_after(self) -> int:
        waiting = len(self._queue) + self._running
        return max(1, min(3600, math.ceil(self._mean_seconds * waiting / self.workers)))

    def _changed(self, job: Job) -> None:
        if self.on_change is not None:
            self.on_change(job.id)

    def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        job.image = None
        job.version += 1

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            job = self._jobs[self._queue.popleft()]
            job.state, job.started = JobState.RUNNING, time.time()
            job.version += 1
            self._running += 1
        self._changed(job)
        return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                self._run(job)
                outcome, error = JobState.DONE, None
            except JobCancelled:
                outcome, error = JobState.CANCELLED, "cancelled while running"
            except ModelLoadError as exc:
                outcome, error = JobState.FAILED, str(exc)
            except Exception as exc:  # a crashing job fails that job only; the worker goes on
                outcome, error = JobState.FAILED, _reason(exc)
            with self._cond:
                self._running -= 1
                if job.started is not None and outcome == JobState.DONE:
                    self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.time() - job.started)
                if job.result_path is not None and outcome != JobState.DONE:
                    job.result_path.unlink(missing_ok=True)
                    job.result_path = None
                self._finish(job, outcome, error)
            self._changed(job)
            _release_memory()

    def _run(self, job: Job) -> None:
        def on_progress(progress: Progress) -> None:
            if job.cancel_requested:
                raise JobCancelled()
            job.stage, job.done, job.total = progress.stage, progress.done, progress.total
            job.version += 1
            self._changed(job)

        on_progress(Progress("loading", 0, 0))
        try:
            pipeline, in_use = self.models.get(job.method, job.load_values)
        except Exception as exc:
            names = {k: v for k, v in job.shown_options.items() if k in job.load_values}
            shown = ", ".join(f"{k}={v}" for k, v in names.items())
            raise ModelLoadError(f"cannot load {job.method} ({shown}): {_reason(exc)}") from exc
        if in_use.locked():
            on_progress(Progress("waiting for the model", 0, 0))
        with in_use:
            assert job.image is not None
            result = pipeline.upscale(job.image, on_progress=on_progress, **job.run_values)
            settings = pipeline.settings(**job.run_values)
        fmt = job.output_format
        if fmt == "auto":
            fmt = job.input_format if job.input_format in WRITABLE_FORMATS else "PNG"
        on_progress(Progress("encoding", 0, 1))
        data = encode_image(result, fmt, settings)
        path = job.directory / ("result." + FORMAT_SUFFIXES[fmt])
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(path)
        job.result_path, job.result_format = path, fmt
        job.result_width, job.result_height = result.width, result.height
        job.stage, job.done, job.total = "encoding", 1, 1

    def _janitor(self) -> None:
        interval = max(0.05, min(30.0, self.result_ttl / 4))
        while not self._stopped.wait(interval):
            self.expire()


def _reason(exc: BaseException) -> str:
    """One line for the job's error field."""
    if is_out_of_memory(exc):
        return "out of memory; try a smaller tile size or a smaller image"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _release_memory() -> None:
    """Hand freed image buffers back to the system, so the server's memory returns to its baseline.

    glibc keeps freed heap pages for reuse; after a burst of large images that shows as a
    resident size that never falls. malloc_trim returns them (a no-op elsewhere).
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
