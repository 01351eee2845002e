"""Load test of `diffsr serve` on localhost: many jobs from concurrent clients against a small queue.

    PYTHONPATH=. python benchmarks/bench_server.py --jobs 50 --clients 8 --max-queue 4

Starts `diffsr serve` as a child process (a tiny random 4x model by default, so the figures
measure the server, not the network; `--model realesrgan-x4plus` for the real one), warms it up,
then each client submits its share of jobs one after another and follows each accepted job to
its result. Each job checks that the server echoes its own upload and returns a 4x result, and
all results must differ (every input is different), so a mix-up or duplicate would show. Prints accepted/rejected counts, latencies and the server's resident memory before,
at the peak and after (all jobs deleted). Exits non-zero if a job was lost, duplicated or wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[int, str | None]] = field(default_factory=list)
    """(status, Retry-After) of each refused submission."""
    unexpected: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    result_digests: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    """One HTTP exchange; the headers answer .get() case-insensitively."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def multipart(image: bytes, options: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="job.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n\r\n{json.dumps(options)}\r\n'.encode(),
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def job_image(index: int, side: int) -> tuple[bytes, tuple[int, int]]:
    """A PNG of random pixels seeded by the job index, in one of four sizes around side x side.

    Few sizes on purpose: torch's CPU kernels keep a cache entry per input shape, so every new
    size grows the process a little (until the cache is full); the warm-up visits all four.
    """
    height, width = side + index % 2, side + (index // 2) % 2
    rng = np.random.default_rng(index)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue(), (width, height)


def resident_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(model_dir: Path, max_queue: int, workers: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "diffsr.cli.main", "serve", "--port", str(port), "--model-dir", str(model_dir),
         "--max-queue", str(max_queue), "--workers", str(workers), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if request("GET", base + "/api/health")[0] == 200:
                return process, base
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 120 s")


def follow(base: str, job_id: str, sent: bytes, expected: tuple[int, int], outcome: Outcome, started: float) -> None:
    while True:
        status, _, body = request("GET", f"{base}/api/jobs/{job_id}")
        job = json.loads(body)
        if status != 200 or job["state"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.03)
    ok = status == 200 and job["state"] == "done"
    if ok:
        result_status, _, data = request("GET", f"{base}/api/jobs/{job_id}/result")
        size = Image.open(io.BytesIO(data)).size if result_status == 200 else None
        echoed = request("GET", f"{base}/api/jobs/{job_id}/input")[2]
        ok = size == (expected[0] * 4, expected[1] * 4) and echoed == sent
        with outcome.lock:
            outcome.result_digests.append(hashlib.sha256(data).hexdigest())
    request("DELETE", f"{base}/api/jobs/{job_id}")
    with outcome.lock:
        (outcome.completed if ok else outcome.wrong).append(job_id)
        outcome.latencies.append(time.monotonic() - started)


def client(base: str, indices: list[int], model: str, outcome: Outcome, side: int) -> None:
    for index in indices:
        image, size = job_image(index, side)
        body, content_type = multipart(image, {"model": model})
        started = time.monotonic()
        status, headers, answer = request("POST", f"{base}/api/jobs", body, {"Content-Type": content_type})
        if status == 202:
            job_id = json.loads(answer)["id"]
            with outcome.lock:
                outcome.accepted.append(job_id)
            follow(base, job_id, image, size, outcome, started)
        elif status in (429, 503):
            with outcome.lock:
                outcome.rejected.append((status, headers.get("Retry-After")))
        else:
            with outcome.lock:
                outcome.unexpected.append(f"{status}: {answer[:200]!r}")


def run_load(jobs: int = 50, clients: int = 8, max_queue: int = 4, workers: int = 1, model: str | None = None,
             side: int = 96) -> dict:
    """Run the load test; returns the figures (also printed)."""
    with tempfile.TemporaryDirectory(prefix="diffsr-bench-server-") as tmp:
        model_dir = Path(tmp)
        if model is None:
            sys.path.insert(0, str(REPO / "tests"))
            from tiny_models import compact_state, save_pth

            save_pth(model_dir / "tiny.pth", compact_state(nf=4, num_conv=1))
            model = "tiny.pth"
        process, base = start_server(model_dir, max_queue, workers)
        try:
            warm = Outcome()
            client(base, [1000, 1001, 1002, 1003], model, warm, side)  # loads the model, visits the four sizes
            if len(warm.completed) != 4:
                raise RuntimeError(f"warm-up failed: {warm}")
            time.sleep(0.5)
            baseline = resident_mib(process.pid)
            peak = [baseline]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], resident_mib(process.pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            outcome = Outcome()
            shares = [list(range(jobs))[k::clients] for k in range(clients)]
            threads = [threading.Thread(target=client, args=(base, share, model, outcome, side)) for share in shares]
            began = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.monotonic() - began
            stop.set()
            sampler.join()
            time.sleep(0.5)
            after = resident_mib(process.pid)
            health = json.loads(request("GET", base + "/api/health")[2])
        finally:
            process.terminate()
            process.wait(30)
    lat = sorted(outcome.latencies)
    figures = {
        "jobs": jobs, "clients": clients, "input_side": side, "max_queue": max_queue, "workers": workers, "model": model,
        "accepted": len(outcome.accepted), "rejected": len(outcome.rejected), "unexpected": outcome.unexpected,
        "completed": len(outcome.completed), "wrong_or_failed": outcome.wrong,
        "duplicate_ids": len(outcome.accepted) - len(set(outcome.accepted)),
        "duplicate_results": len(outcome.result_digests) - len(set(outcome.result_digests)),
        "rejections_without_retry_after": sum(1 for _, retry in outcome.rejected if not retry),
        "rejection_statuses": sorted({status for status, _ in outcome.rejected}),
        "jobs_left_on_server": sum(health["jobs"].values()),
        "wall_s": round(wall, 2), "accepted_per_s": round(len(outcome.accepted) / wall, 1),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "rss_baseline_mib": round(baseline, 1), "rss_peak_mib": round(peak[0], 1), "rss_after_mib": round(after, 1),
    }
    for key, value in figures.items():
        print(f"{key:>32}: {value}")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--side", type=int, default=96, help="input images are about SIDE x SIDE pixels (default: 96)")
    parser.add_argument("--model", default=None, help="a built-in model name (default: a tiny random 4x model)")
    args = parser.parse_args()
    figures = run_load(args.jobs, args.clients, args.max_queue, args.workers, args.model, args.side)
    ok = (figures["accepted"] + figures["rejected"] == figures["jobs"] and figures["completed"] == figures["accepted"]
          and not figures["duplicate_ids"] and not figures["duplicate_results"] and not figures["unexpected"] and not figures["jobs_left_on_server"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
