"""`diffsr serve`: the HTTP API and web page (needs the `server` extra)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from diffsr.io.image import DEFAULT_MAX_PIXELS

TOKEN_ENV = "DIFFSR_SERVER_TOKEN"


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP API and web page (pip install 'diffsr[server]')",
        description="Serve an HTTP API with a job queue and a web page for upscaling. Binds to localhost unless --host says otherwise.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=_positive, default=1,
                        help="jobs run at once on worker threads; one model runs one job at a time (default: %(default)s)")
    parser.add_argument("--max-queue", type=_positive, default=8,
                        help="jobs that may wait; more get 503 with Retry-After (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"require this token on every request (default: ${TOKEN_ENV} if set)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="folder of model files (.pth/.safetensors/.ckpt) that requests may pick by file name")
    parser.add_argument("--device", default="auto", help="device for every job: auto, cpu, cuda, cuda:N, mps (default: %(default)s)")
    parser.add_argument("--max-models", type=_positive, default=2, help="loaded models kept in memory (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=64.0, help="largest upload in MiB (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images over this many pixels, a decompression-bomb guard; 0 = no limit (default: %(default)s)")
    parser.add_argument("--result-ttl", type=float, default=3600.0,
                        help="seconds a finished job's result is kept before its files are deleted (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for uploads and results (default: a temporary folder removed at exit)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from diffsr.server import ServerConfig, create_app
    except ImportError as exc:
        print(f"diffsr: the server needs its extra ({exc.name} is missing); install it with: pip install 'diffsr[server]'",
              file=sys.stderr)
        return 1
    if args.model_dir is not None and not args.model_dir.is_dir():
        print(f"diffsr: --model-dir {args.model_dir}: no such folder; create it or pass another", file=sys.stderr)
        return 2
    if not args.token and not _is_loopback(args.host):
        print(f"diffsr: warning: serving on {args.host} without --token: anyone who can reach this port can run jobs",
              file=sys.stderr)
    config = ServerConfig(
        workers=args.workers, max_queue=args.max_queue, token=args.token or None,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels or None,
        result_ttl=args.result_ttl, model_dir=args.model_dir, device=args.device, max_models=args.max_models,
        work_dir=args.work_dir,
    )
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
    print(f"diffsr: serving on http://{shown}:{args.port}/" + ("?token=…" if args.token else ""), file=sys.stderr)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
