"""Benchmark methods on a dataset: run each, time it, measure its memory, score its outputs.

A method is named by a spec string, so that any method in `diffsr.registry` can be benchmarked
without changes here:

    bicubic                                   the baseline: Pillow bicubic to the ground truth's size
    feedforward                               a registry method with its default options
    feedforward:model=realesrgan-x4plus,tile=256
    realesrgan-x4plus                         short for feedforward:model=realesrgan-x4plus

A dataset folder holds `LR/` and `HR/` with the same file stems (as DRealSR), or only low-quality
images (in `LR/` or the folder itself), which are scored with no-reference metrics.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffsr import __version__
from diffsr.io import ImageData, read_image, write_image
from diffsr.metrics.evaluate import Evaluation, ImagePair, Scorer, pair_folders, quantise_like_file
from diffsr.models.defaults import DEFAULT_MODELS
from diffsr.options import OptionError
from diffsr.progress import OptionalCallback, report
from diffsr.registry import METHOD_MODULES, get_method
from diffsr.resample import resize_array

BASELINE = "bicubic"


class BenchError(ValueError):
    """A method spec or dataset that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class MethodSpec:
    label: str
    """As the user wrote it; names the method in tables, plots and folders."""
    method: str
    """"bicubic" or a name in diffsr.registry."""
    options: dict[str, str]

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label).strip("_") or "method"


def parse_method_spec(text: str) -> MethodSpec:
    """'NAME[:key=value,key=value]'; NAME is bicubic, a registry method or a built-in model name."""
    name, _, rest = text.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--method {text}: '{item}' is not key=value; write e.g. feedforward:model=realesrgan-x4plus,tile=256")
        options[key.strip().replace("-", "_")] = value.strip()
    if name in DEFAULT_MODELS and name not in METHOD_MODULES:
        return MethodSpec(text, "feedforward", {"model": name, **options})
    if name != BASELINE and name not in METHOD_MODULES:
        known = [BASELINE, *METHOD_MODULES, *DEFAULT_MODELS]
        raise BenchError(f"--method {text}: unknown method '{name}'; available: {', '.join(known)}")
    return MethodSpec(text, name, options)


class BicubicBaseline:
    """Pillow's bicubic resize to the ground truth's size (or by `scale` without one)."""

    def __init__(self, scale: float):
        self.scale = scale
        self.device = torch.device("cpu")

    def upscale(self, image: ImageData, on_progress: OptionalCallback = None, target: tuple[int, int] | None = None) -> ImageData:
        size = target or (round(image.height * self.scale), round(image.width * self.scale))
        alpha = None if image.alpha is None else resize_array(image.alpha[:, :, None], size, "bicubic")[:, :, 0]
        return image.with_pixels(np.clip(resize_array(image.pixels, size, "bicubic"), 0, 1), alpha)

    def settings(self) -> dict[str, Any]:
        return {"diffsr": __version__, "method": BASELINE, "filter": "Pillow bicubic", "scale": self.scale}


@dataclass(frozen=True)
class Dataset:
    name: str
    pairs: list[ImagePair]
    """pred = the low-quality input, gt = its high-resolution partner (or None)."""
    problems: list[tuple[str, str]]

    @property
    def has_ground_truth(self) -> bool:
        return any(p.gt is not None for p in self.pairs)


def open_dataset(folder: Path, limit: int | None = None) -> Dataset:
    if not folder.is_dir():
        raise BenchError(f"--dataset {folder} is not a folder; pass a folder with LR/ and HR/ (or of images)")
    lr = folder / "LR" if (folder / "LR").is_dir() else folder
    hr = folder / "HR" if (folder / "HR").is_dir() else None
    pairs, problems = pair_folders(lr, hr)
    if not pairs:
        raise BenchError(f"--dataset {folder}: no images found in {lr}")
    return Dataset(folder.name, pairs[:limit] if limit else pairs, problems)


def infer_scale(dataset: Dataset, default: float = 4.0) -> float:
    """HR width over LR width of the first pair: the scale the dataset asks for."""
    pair = dataset.pairs[0]
    if pair.gt is None:
        return default
    from PIL import Image

    with Image.open(pair.pred) as low, Image.open(pair.gt) as high:
        return high.width / low.width


@dataclass
class MethodRun:
    spec: MethodSpec
    evaluation: Evaluation
    seconds: dict[str, float] = field(default_factory=dict)
    """image name -> seconds for the method's own work on it (no reading, writing or scoring)."""
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    """Untimed first runs on the first image (not in seconds per image)."""
    peak_rss_bytes: int | None = None
    peak_rss_scope: str = ""
    """"method": the peak while this method ran; "process": since the process started (fallback)."""
    peak_cuda_bytes: int | None = None
    device: str = "cpu"
    error: str | None = None
    """Why the method could not run at all."""
    settings: dict[str, Any] = field(default_factory=dict)
    crops: dict[str, np.ndarray] = field(default_factory=dict)
    """image name -> the crop shown in the report."""

    @property
    def seconds_per_image(self) -> float:
        return float(np.mean(list(self.seconds.values()))) if self.seconds else float("nan")

    @property
    def median_seconds(self) -> float:
        """Less swayed than the mean by other programs competing for the CPU."""
        return float(np.median(list(self.seconds.values()))) if self.seconds else float("nan")


def method_values(spec: MethodSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec's load and run options, checked against the method's schema (nothing is loaded)."""
    if spec.method == BASELINE:
        unknown = set(spec.options) - {"scale"}
        if unknown:
            raise BenchError(f"--method {spec.label}: bicubic takes only scale=, not {', '.join(sorted(unknown))}")
        try:
            return {"scale": float(spec.options["scale"])} if "scale" in spec.options else {}, {}
        except ValueError:
            raise BenchError(f"--method {spec.label}: scale must be a number") from None
    method = get_method(spec.method)
    try:
        values = method.options.validate(spec.options)
    except OptionError as exc:
        raise BenchError(f"--method {spec.label}: {exc}; options of {method.name}: {', '.join(method.options.by_name)}") from None
    load_values = {o.name: values[o.name] for o in method.load_options().options}
    run_values = {o.name: values[o.name] for o in method.run_options().options}
    return load_values, run_values


def load_method(spec: MethodSpec, scale: float) -> tuple[Any, dict[str, Any]]:
    """The pipeline of a spec and the run options to call it with."""
    load_values, run_values = method_values(spec)
    if spec.method == BASELINE:
        return BicubicBaseline(load_values.get("scale", scale)), {}
    return get_method(spec.method).open(**load_values), run_values


def run_method(
    spec: MethodSpec,
    dataset: Dataset,
    scorer: Scorer,
    scale: float,
    output_dir: Path | None,
    crop_boxes: dict[str, tuple[int, int, int]],
    warmup: int = 1,
    on_progress: OptionalCallback = None,
) -> MethodRun:
    """Run one method over the dataset; errors on single images are recorded and the run goes on."""
    run = MethodRun(spec, Evaluation(metrics=list(scorer.names)))
    scoped = _reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        pipeline, run_values = load_method(spec, scale)
    except (ValueError, OSError, RuntimeError) as exc:  # BenchError, WeightsError, a missing model file...
        run.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return run
    run.load_seconds = time.perf_counter() - started
    run.device = str(getattr(pipeline, "device", "unknown"))
    run.settings = pipeline.settings(**run_values)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)

    def upscale(image: ImageData, target: tuple[int, int] | None) -> tuple[ImageData, float]:
        options = {"target": target} if spec.method == BASELINE else run_values
        tick = time.perf_counter()
        out = pipeline.upscale(image, on_progress=on_progress, **options)
        if cuda:
            torch.cuda.synchronize()  # queued GPU work belongs to this image
        return out, time.perf_counter() - tick

    if warmup:  # first calls pay for kernel selection and caches; they would distort seconds per image
        try:
            first = read_image(dataset.pairs[0].pred)
            for _ in range(warmup):
                run.warmup_seconds += upscale(first, None)[1]
        except (ValueError, OSError, RuntimeError):
            pass  # the timed loop reports this image's problem

    for done, pair in enumerate(dataset.pairs):
        try:
            image = read_image(pair.pred)
            gt = read_image(pair.gt).pixels if pair.gt is not None else None
            out, run.seconds[pair.name] = upscale(image, gt.shape[:2] if gt is not None else None)
            if output_dir is not None:
                write_image(output_dir / f"{Path(pair.name).stem}.png", out, settings=run.settings)
            pixels = quantise_like_file(out)
            run.evaluation.rows[pair.name] = scorer.score(pixels, gt)
            if pair.name in crop_boxes:
                run.crops[pair.name] = _crop(pixels, crop_boxes[pair.name])
        except (ValueError, OSError, RuntimeError) as exc:  # a bad file or a failed run: next image
            run.evaluation.failed.append((pair.name, f"{pair.pred}: {exc}".splitlines()[0]))
        report(on_progress, "files", done + 1, len(dataset.pairs), pair.name)

    run.peak_rss_bytes, run.peak_rss_scope = _peak_rss(), "method" if scoped else "process"
    if cuda and torch.cuda.max_memory_allocated() > 0:
        run.peak_cuda_bytes = torch.cuda.max_memory_allocated()
    return run


def choose_crop_boxes(dataset: Dataset, count: int, size: int, scale: float) -> dict[str, tuple[int, int, int]]:
    """For `count` images spread over the dataset, (top, left, size) of its most detailed window, in output pixels."""
    if count <= 0:
        return {}
    indices = np.unique(np.linspace(0, len(dataset.pairs) - 1, min(count, len(dataset.pairs))).round().astype(int))
    boxes = {}
    for index in indices:
        pair = dataset.pairs[index]
        try:
            if pair.gt is not None:
                boxes[pair.name] = (*_detailed_window(read_image(pair.gt).pixels.mean(axis=2), size), size)
            else:  # no ground truth: find the window on the input and map it to output pixels
                small = max(4, round(size / scale))
                top, left = _detailed_window(read_image(pair.pred).pixels.mean(axis=2), small)
                boxes[pair.name] = (round(top * scale), round(left * scale), size)
        except ValueError:
            continue
    return boxes


def _detailed_window(grey: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left of the size x size window with the most gradient energy (stride size/2)."""
    size = min(size, *grey.shape)
    energy = np.abs(np.diff(grey, axis=0))[:, :-1] + np.abs(np.diff(grey, axis=1))[:-1]
    best, best_at = -1.0, (0, 0)
    step = max(1, size // 2)
    for top in range(0, max(1, energy.shape[0] - size + 1), step):
        for left in range(0, max(1, energy.shape[1] - size + 1), step):
            value = float(energy[top : top + size, left : left + size].sum())
            if value > best:
                best, best_at = value, (top, left)
    return best_at


def _crop(pixels: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    top, left, size = box
    return pixels[top : top + size, left : left + size].copy()


def crop_of_input(image: np.ndarray, box: tuple[int, int, int], scale: float) -> np.ndarray:
    """The input region under an output crop, for showing the LR beside the results."""
    top, left, size = box
    t, l, s = int(top / scale), int(left / scale), max(1, round(size / scale))
    return image[t : t + s, l : l + s].copy()


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux), so each method's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes
