"""Reader for ncnn `.param` / `.bin` model files.

Only what is needed to recover PyTorch weights is implemented: the layer list of the
text `.param` format and the weight blobs of the layers that carry weights
(Convolution, PReLU). The ncnn runtime itself is never imported: it needs Vulkan.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PARAM_MAGIC = 7767517
_FP16_TAG = 0x01306B47
_INT8_TAG = 0x000D4B38


class NcnnFormatError(ValueError):
    """The ncnn files are not what the converter expects."""


@dataclass
class NcnnLayer:
    kind: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, str]
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def int_param(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))


def read_param(path: Path) -> list[NcnnLayer]:
    lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not lines or lines[0] != [str(PARAM_MAGIC)]:
        raise NcnnFormatError(f"{path}: not an ncnn text .param file (magic number missing)")
    layer_count = int(lines[1][0])
    layers = []
    for tokens in lines[2 : 2 + layer_count]:
        kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        bottoms = tokens[4 : 4 + n_in]
        tops = tokens[4 + n_in : 4 + n_in + n_out]
        params = {}
        for item in tokens[4 + n_in + n_out :]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append(NcnnLayer(kind, name, bottoms, tops, params))
    if len(layers) != layer_count:
        raise NcnnFormatError(f"{path}: header says {layer_count} layers, file has {len(layers)}")
    return layers


class _BlobReader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = data, 0, path

    def _take(self, nbytes: int) -> bytes:
        if self.offset + nbytes > len(self.data):
            raise NcnnFormatError(f"{self.path}: truncated weight file (needs more than {len(self.data)} bytes)")
        chunk = self.data[self.offset : self.offset + nbytes]
        self.offset += nbytes
        return chunk

    def raw_float32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(4 * count), dtype="<f4").copy()

    def tagged(self, count: int) -> np.ndarray:
        """A weight blob that starts with ncnn's 4-byte storage tag (float32, float16)."""
        (tag,) = struct.unpack("<I", self._take(4))
        if tag == 0:
            return self.raw_float32(count)
        if tag == _FP16_TAG:
            values = np.frombuffer(self._take(2 * count), dtype="<f2").astype(np.float32)
            self._take((-2 * count) % 4)  # blobs are padded to 4 bytes
            return values
        if tag == _INT8_TAG:
            raise NcnnFormatError(f"{self.path}: int8-quantised ncnn weights are not supported")
        raise NcnnFormatError(f"{self.path}: unknown ncnn weight storage tag {tag:#010x}")


def read_model(param_path: Path, bin_path: Path) -> list[NcnnLayer]:
    """Layers of an ncnn model with the weights of Convolution and PReLU layers attached."""
    layers = read_param(param_path)
    reader = _BlobReader(Path(bin_path).read_bytes(), Path(bin_path))
    for layer in layers:
        if layer.kind == "Convolution":
            out_ch, kernel = layer.int_param(0), layer.int_param(1)
            size = layer.int_param(6)
            in_ch = size // (out_ch * kernel * kernel)
            if in_ch * out_ch * kernel * kernel != size:
                raise NcnnFormatError(f"{param_path}: layer {layer.name} has inconsistent weight size")
            if layer.int_param(7, 1) != 1:
                raise NcnnFormatError(f"{param_path}: grouped convolution {layer.name} is not supported")
            layer.weights["weight"] = reader.tagged(size).reshape(out_ch, in_ch, kernel, kernel)
            if layer.int_param(5):
                layer.weights["bias"] = reader.raw_float32(out_ch)
        elif layer.kind == "PReLU":
            layer.weights["weight"] = reader.raw_float32(layer.int_param(0))
        elif layer.kind in {"InnerProduct", "Deconvolution", "ConvolutionDepthWise", "BatchNorm", "Scale"}:
            raise NcnnFormatError(f"{param_path}: layer type {layer.kind} is not supported by the converter")
    if reader.offset != len(reader.data):
        raise NcnnFormatError(
            f"{bin_path}: {len(reader.data) - reader.offset} bytes left over: the .bin does not match the .param"
        )
    return layers
