"""Batches on Ray Data: the local engine's per-file work, run in actors that keep a model loaded.

The driver reads the manifest, hands the finished records to the actors, streams the inputs
through `map_batches` (one model load per actor; GPUs per actor as asked) and records each
outcome in the manifest as it comes back, so a killed Ray job resumes exactly like a local one.
Outputs are written by the actors with the same atomic writes, so a file under its final name is
always complete. With no address a local Ray instance is started on this machine.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from typing import Any

from diffsr.batch import BatchConfig, FileWorker, InputFile, Outcome, OutputClaims, Recorder, Summary, failure, output_path
from diffsr.io.image import FORMAT_BY_SUFFIX, ImageError
from diffsr.io.storage import RemoteFile, is_uri
from diffsr.manifest import Record
from diffsr.progress import OptionalCallback


class _MethodActor:
    """A Ray actor: loads the method once, then runs FileWorker on each batch of paths."""

    def __init__(self, method: str, load_values: dict, run_values: dict, config: BatchConfig, finished: dict, threads: int):
        import torch

        from diffsr.registry import get_method

        torch.set_num_threads(max(1, threads))
        self.pipeline = get_method(method).open(**load_values)
        self.run_values = run_values
        self.worker = FileWorker(config, finished, details=self.pipeline.settings(**run_values))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: dict[str, list] = {"key": [], "outcome": []}
        for item in _items(batch):
            outcome = self.worker(item, lambda image: self.pipeline.upscale(image, **self.run_values))
            rows["key"].append(item.key())
            rows["outcome"].append(_encode(outcome))
        return rows


def _rows(items: list[InputFile]) -> list[dict[str, str]]:
    """Inputs as Ray Data rows (plain strings; a remote file as its folder URI and relative path)."""
    return [{"path": str(i.path), "relative": str(i.relative), "root": i.remote.root if i.remote else "",
             "remote": i.remote.relative if i.remote else ""} for i in items]


def _items(batch: dict[str, Any]) -> list[InputFile]:
    return [InputFile(Path(path), Path(relative), RemoteFile(root, remote) if root else None)
            for path, relative, root, remote in zip(batch["path"], batch["relative"], batch["root"], batch["remote"])]


def _encode(outcome: Outcome) -> str:
    return json.dumps({
        "state": outcome.state,
        "record": asdict(outcome.record) if outcome.record else None,
        "target": str(outcome.target) if outcome.target is not None else None,
        "reason": outcome.reason,
        "notes": list(outcome.notes),
    })


def _decode(item: InputFile, text: str) -> Outcome:
    data = json.loads(text)
    record = Record(**data["record"]) if data["record"] else None
    target = data["target"]
    if target is not None and not is_uri(target):
        target = Path(target)
    return Outcome(item, data["state"], record, target, data["reason"], tuple(data["notes"]))


def _expected_target(item: InputFile, output: Any, config: BatchConfig) -> str:
    """The identity of the output an input will get, from its suffix (the actors decide the rare alpha-to-PNG case)."""
    suffix = item.path.suffix.lower()
    source_format = "GIF" if suffix == ".gif" else FORMAT_BY_SUFFIX.get(suffix)
    relative = output_path(item, Path(), source_format, False, config.ext, config.suffix)[0]
    return output.identity(PurePosixPath(relative.as_posix()))


def require_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError("--engine ray needs Ray Data, which is not installed: pip install 'diffsr[ray]'") from None
    return ray


def _start(address: str | None):
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # diffsr's own bar follows the recorded outcomes
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


def _stream(items: list[InputFile], actor: type, kwargs: dict, workers: int, gpus: float, batch_size: int, address: str | None):
    """Yield (item, encoded outcome) as the actors finish them."""
    ray = _start(address)
    by_key = {item.key(): item for item in items}
    cpus = max(1.0, (os.cpu_count() or 1) / max(workers, 1)) if not gpus else 1.0
    dataset = ray.data.from_items(_rows(items))
    results = dataset.map_batches(
        actor,
        fn_constructor_kwargs={**kwargs, "threads": int(cpus)},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=gpus or None,
    )
    for row in results.iter_rows():
        yield by_key[row["key"]], row["outcome"]


def run_batch_ray(
    items: list[InputFile],
    method: str,
    load_values: dict[str, Any],
    run_values: dict[str, Any],
    config: BatchConfig,
    address: str | None = None,
    workers: int = 1,
    num_gpus_per_worker: float = 0.0,
    batch_size: int = 1,
    on_progress: OptionalCallback = None,
) -> Summary:
    recorder = Recorder(config, len(items), on_progress)
    claims = OutputClaims(items)
    todo = []
    for item in items:
        try:
            claims(item, _expected_target(item, recorder.output, config))
            todo.append(item)
        except ImageError as exc:
            recorder(failure(item, str(exc), config.digest))
    kwargs = {"method": method, "load_values": load_values, "run_values": run_values, "config": config,
              "finished": recorder.manifest.records}
    try:
        for item, text in _stream(todo, _MethodActor, kwargs, workers, num_gpus_per_worker, batch_size, address) if todo else ():
            recorder(_decode(item, text))
    finally:
        recorder.close()
    return recorder.summary


class _DegradeActor:
    """A Ray actor that degrades its share of the inputs with its own Degrader."""

    def __init__(self, out_dir: Path, config: Any, scale: int, seed: int, crop: int | None, group: int,
                 max_pixels: int | None, finished: dict, threads: int):
        import torch

        from diffsr.data.pairs import PairWorker
        from diffsr.degrade.pipeline import Degrader

        torch.set_num_threads(max(1, threads))
        self.worker = PairWorker(out_dir, Degrader(config, scale), seed, crop, group, max_pixels, finished)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: dict[str, list] = {"key": [], "outcome": []}
        for outcome in self.worker(_items(batch)):
            rows["key"].append(outcome.item.key())
            rows["outcome"].append(json.dumps({
                "state": outcome.state,
                "record": asdict(outcome.record) if outcome.record else None,
                "reason": outcome.reason,
                "note": outcome.note,
            }))
        return rows


def ray_pair_runner(out_dir: Path, degrader: Any, seed: int, crop: int | None, batch_size: int, max_pixels: int | None,
                    address: str | None = None, workers: int = 1, num_gpus_per_worker: float = 0.0):
    """A `make_pairs` runner that spreads the inputs over Ray actors, `batch_size` images per Ray batch.

    Every image's seed comes from its relative path, so a pair does not depend on which worker made it.
    """
    from diffsr.data.pairs import PairOutcome

    def run(todo: list[InputFile], finished: dict):
        kwargs = {"out_dir": Path(out_dir), "config": degrader.config, "scale": degrader.scale, "seed": seed, "crop": crop,
                  "group": batch_size, "max_pixels": max_pixels, "finished": finished}
        for item, text in _stream(todo, _DegradeActor, kwargs, workers, num_gpus_per_worker, batch_size, address) if todo else ():
            data = json.loads(text)
            record = Record(**data["record"]) if data["record"] else None
            yield PairOutcome(item, data["state"], record, data["reason"], data["note"])

    return run
