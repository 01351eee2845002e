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
from pathlib import Path
from typing import Any

from diffsr.batch import BatchConfig, FileWorker, InputFile, Outcome, OutputClaims, Recorder, Summary
from diffsr.io.image import FORMAT_BY_SUFFIX, ImageError, SUFFIX_BY_FORMAT
from diffsr.manifest import Record
from diffsr.progress import OptionalCallback


class _MethodActor:
    """A Ray actor: loads the method once, then runs FileWorker on each batch of paths."""

    def __init__(self, method: str, load_values: dict, run_values: dict, config: BatchConfig, finished: dict, threads: int):
        import torch

        from diffsr.registry import get_method

        torch.set_num_threads(max(1, threads))
        self.pipeline = get_method(method).load(**load_values)
        self.run_values = run_values
        self.worker = FileWorker(config, finished, details=self.pipeline.settings(**run_values))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows: dict[str, list] = {"path": [], "relative": [], "outcome": []}
        for path, relative in zip(batch["path"], batch["relative"]):
            item = InputFile(Path(path), Path(relative))
            outcome = self.worker(item, lambda image: self.pipeline.upscale(image, **self.run_values))
            rows["path"].append(path)
            rows["relative"].append(relative)
            rows["outcome"].append(_encode(outcome))
        return rows


def _encode(outcome: Outcome) -> str:
    return json.dumps({
        "state": outcome.state,
        "record": asdict(outcome.record) if outcome.record else None,
        "target": str(outcome.target) if outcome.target else None,
        "reason": outcome.reason,
        "notes": list(outcome.notes),
    })


def _decode(item: InputFile, text: str) -> Outcome:
    data = json.loads(text)
    record = Record(**data["record"]) if data["record"] else None
    target = Path(data["target"]) if data["target"] else None
    return Outcome(item, data["state"], record, target, data["reason"], tuple(data["notes"]))


def _expected_target(item: InputFile, config: BatchConfig) -> Path:
    """The output name an input will get, from its suffix (the actors decide the rare alpha-to-PNG case)."""
    if config.ext == "auto":
        fmt = FORMAT_BY_SUFFIX.get(item.path.suffix.lower(), "PNG" if item.path.suffix.lower() == ".gif" else None)
        ext = SUFFIX_BY_FORMAT.get(fmt or "", "png")
    else:
        ext = config.ext.lower().lstrip(".")
    stem = f"{item.relative.stem}_{config.suffix}" if config.suffix else item.relative.stem
    return config.out_dir / item.relative.parent / f"{stem}.{ext}"


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
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # diffsr's own bar follows the recorded outcomes
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    recorder = Recorder(config, len(items), on_progress)
    claims = OutputClaims(items)
    todo = []
    for item in items:
        try:
            claims(item, _expected_target(item, config))
            todo.append(item)
        except ImageError as exc:
            recorder(FileWorker(config, {})._failed(item, str(exc)))
    if not todo:
        return recorder.summary
    by_path = {str(item.path): item for item in todo}
    cpus = max(1.0, (os.cpu_count() or 1) / max(workers, 1)) if not num_gpus_per_worker else 1.0
    dataset = ray.data.from_items([{"path": str(i.path), "relative": str(i.relative)} for i in todo])
    results = dataset.map_batches(
        _MethodActor,
        fn_constructor_kwargs={
            "method": method,
            "load_values": load_values,
            "run_values": run_values,
            "config": config,
            "finished": recorder.manifest.records,
            "threads": int(cpus),
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus,
        num_gpus=num_gpus_per_worker or None,
    )
    for row in results.iter_rows():
        recorder(_decode(by_path[row["path"]], row["outcome"]))
    return recorder.summary
