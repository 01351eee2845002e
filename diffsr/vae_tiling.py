"""Tiled VAE encode and decode with GroupNorm statistics and mid-block attention shared across tiles.

Decoding a 4K image with the SD VAE in one piece needs tens of GB. Cutting it into tiles and decoding
each alone leaves seams: every GroupNorm then normalises with its own tile's statistics, and the
mid-block attention sees only its tile. This module runs the encoder or decoder as a list of
operations executed over all tiles in lockstep (the scheme of the multidiffusion-upscaler Tiled VAE
and OSEDiff's vaehook), and at every GroupNorm it stops, combines the per-tile statistics into the
image's statistics, and normalises every tile with them. Two differences from that hook, both
making the tiled result closer to the untiled one:

- statistics are taken over each tile's own core (the tiles' cores partition the image) and
  combined exactly (Chan's parallel mean/variance in float64), not averaged over padded tiles;
- the mid-block attention is global: every tile's queries attend to the keys and values of all
  tiles' cores, so that layer is exact too.

What remains approximate is only the convolution context beyond each tile's halo (`halo` input
pixels: 64 image pixels for the encoder, 11 latent pixels = 88 output pixels for the decoder by
default; vaehook uses 32 and 11). With a halo that covers the receptive field the tiled result
equals the untiled one to float rounding (tests/test_vae_tiling.py).
Between operations a tile's activations are parked on `storage` (the CPU when the model runs on a
GPU), so device memory is bounded by one tile's working set plus the attention keys/values of the
whole latent (tokens x 512 channels x 2, e.g. 134 MB in fp16 for a 2048 px image). Statistics are
computed in float32 and combined in float64, so fp16/bf16 runs normalise as accurately as fp32.

`statistics="vaehook"` switches to the official hook's behaviour instead (its tile split and
rounding, pixel-weighted averages of the padded tiles' statistics, eps 1e-6, tile-local attention,
inputs up to tile + 2 * pad untiled): it reproduces OSEDiff's tiled-VAE fixture to 2e-6, for ports
that need parity with OSEDiff's or SUPIR's `--use_tile_vae`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from diffsr.progress import OptionalCallback, report

Op = tuple[Any, ...]
QUERY_CHUNK = 4096


@dataclass
class _Tile:
    origin: tuple[int, int]
    """Top-left input pixel of the window the tile computes (core plus halo, clipped to the image)."""
    stats: tuple[int, int, int, int] | None
    """y0, y1, x0, x1 (input pixels) of the region whose statistics it contributes; None: its whole window."""
    out: tuple[int, int, int, int]
    """y0, y1, x0, x1 of the part of the output it writes, in output pixels."""
    x: torch.Tensor | None = None
    stack: list[torch.Tensor] = field(default_factory=list)


def _resnet_ops(resnet: torch.nn.Module) -> list[Op]:
    if getattr(resnet, "upsample", None) is not None or getattr(resnet, "downsample", None) is not None:
        raise NotImplementedError("tiled VAE: resnets with built-in up/downsampling are not supported")
    if getattr(resnet, "time_emb_proj", None) is not None:
        raise NotImplementedError("tiled VAE: time-conditioned resnets are not supported")
    for norm in (resnet.norm1, resnet.norm2):
        if not isinstance(norm, torch.nn.GroupNorm):
            raise NotImplementedError(f"tiled VAE: {type(norm).__name__} normalisation is not supported")
    return [("push",), ("gn", resnet.norm1), ("module", resnet.nonlinearity), ("module", resnet.conv1),
            ("gn", resnet.norm2), ("module", resnet.nonlinearity), ("module", resnet.dropout), ("module", resnet.conv2),
            ("pop_add", resnet.conv_shortcut, resnet.output_scale_factor)]


def _attention_ops(attn: torch.nn.Module) -> list[Op]:
    if attn.group_norm is None or attn.spatial_norm is not None or not attn.residual_connection:
        raise NotImplementedError("tiled VAE: only GroupNorm self-attention with a residual is supported")
    return [("push",), ("gn", attn.group_norm), ("attn", attn), ("pop_add", None, attn.rescale_output_factor)]


def _mid_ops(mid: torch.nn.Module) -> list[Op]:
    ops = _resnet_ops(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            ops += _attention_ops(attn)
        ops += _resnet_ops(resnet)
    return ops


def encoder_ops(encoder: torch.nn.Module) -> list[Op]:
    """diffusers `Encoder` as a flat operation list (conv_in ... conv_out)."""
    ops: list[Op] = [("module", encoder.conv_in)]
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            ops += _resnet_ops(resnet)
        for down in block.downsamplers or ():
            ops.append(("down", down))
    ops += _mid_ops(encoder.mid_block)
    return ops + [("gn", encoder.conv_norm_out), ("module", encoder.conv_act), ("module", encoder.conv_out)]


def decoder_ops(decoder: torch.nn.Module) -> list[Op]:
    """diffusers `Decoder` as a flat operation list (no `latent_embeds`: SD-style decoders)."""
    if not isinstance(decoder.conv_norm_out, torch.nn.GroupNorm):
        raise NotImplementedError("tiled VAE: decoders with spatial (MoVQ) normalisation are not supported")
    ops: list[Op] = [("module", decoder.conv_in)] + _mid_ops(decoder.mid_block)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            ops += _resnet_ops(resnet)
        for up in block.upsamplers or ():
            ops.append(("up", up))
    return ops + [("gn", decoder.conv_norm_out), ("module", decoder.conv_act), ("module", decoder.conv_out)]


def _group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    flat = x.float().reshape(x.shape[0], groups, -1)
    var, mean = torch.var_mean(flat, dim=2, unbiased=False)
    return mean.double(), var.double(), flat.shape[2]


def _combine(stats: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean and (biased) variance of the union of disjoint regions."""
    total = sum(n for _, _, n in stats)
    mean = sum(m * n for m, _, n in stats) / total
    var = sum((v + (m - mean) ** 2) * n for m, v, n in stats) / total
    return mean, var


def _combine_vaehook(stats: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """vaehook's rule: pixel-count-weighted averages of the padded tiles' means and variances, in float32."""
    pixels = torch.tensor([n for _, _, n in stats], dtype=torch.float32)
    pixels = pixels / pixels.max()
    weights = (pixels / pixels.sum())[:, None]
    mean = torch.sum(torch.stack([m.float()[0] for m, _, _ in stats]) * weights, dim=0)
    var = torch.sum(torch.stack([v.float()[0] for _, v, _ in stats]) * weights, dim=0)
    return mean[None], var[None]


def _normalize(x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    n, c = x.shape[:2]
    g = norm.num_groups
    flat = x.float().reshape(1, n * g, c // g, -1)
    flat = F.batch_norm(flat, mean.float().reshape(-1), var.float().reshape(-1), training=False, momentum=0.0,
                        eps=norm.eps if eps is None else eps)
    out = flat.reshape(x.shape)
    if norm.affine:
        shape = (1, c) + (1,) * (x.ndim - 2)
        out = out * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
    return out.to(x.dtype)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


def _split_heads(attn: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)


def _attend(attn: torch.nn.Module, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    queries = _split_heads(attn, attn.to_q(_tokens(x)))
    chunks = [F.scaled_dot_product_attention(queries[:, :, i : i + QUERY_CHUNK], keys, values)
              for i in range(0, queries.shape[2], QUERY_CHUNK)]
    out = torch.cat(chunks, dim=2).transpose(1, 2).reshape(n, h * w, -1).to(queries.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out.transpose(1, 2).reshape(n, c, h, w)


def _vaehook_spans(length: int, tile: int, pad: int) -> list[tuple[int, int, int, int]]:
    """vaehook's split: (output-box start, stop, window start, stop) in input pixels along one axis."""
    count = max(1, math.ceil((length - 2 * pad) / tile))
    size = math.ceil((length - 2 * pad) / count)
    divider = 32
    while divider >= 2:  # vaehook rounds the tile up to a multiple of 32, 16, ... if that still fits
        if size % divider == 0:
            break
        if size - size % divider + divider <= tile:
            size = size - size % divider + divider
            break
        divider //= 2
    spans = []
    for i in range(count):
        start, stop = pad + i * size, min(pad + (i + 1) * size, length)
        spans.append((start if start > pad else 0, stop if stop < length - pad else length, max(0, start - pad), min(length, stop + pad)))
    return spans


def _spans(length: int, tile: int, halo: int, align: int) -> list[tuple[int, int, int, int]]:
    """(core start, core stop, window start, window stop) along one axis; starts are multiples of `align`."""
    tile = max(align, tile // align * align)
    count = max(1, -(-length // tile))
    step = -(-length // count)
    step = -(-step // align) * align
    spans = []
    for start in range(0, length, step):
        stop = min(length, start + step)
        lo = max(0, (start - halo) // align * align)
        spans.append((start, stop, lo, min(length, stop + halo)))
    return spans


STATISTICS = ("exact", "vaehook", "sampled")


class TiledVAERunner:
    """Runs a VAE encoder or decoder over tiles with shared normalisation; see the module docstring.

    `statistics="vaehook"` reproduces OSEDiff's / SUPIR's hook instead (its tile split, averaged
    statistics of the padded tiles, eps 1e-6, tile-local attention), for parity with those codes.
    """

    def __init__(self, ops: list[Op], scale_in: int, tile: int, halo: int, storage: torch.device | None = None,
                 on_progress: OptionalCallback = None, stage: str = "vae", statistics: str = "exact", sample: int = 4):
        if statistics not in STATISTICS:
            raise ValueError(f"unknown tiled-VAE statistics '{statistics}'; use one of {', '.join(STATISTICS)}")
        self.ops = ops
        self.align = scale_in
        """Input pixels per output pixel at the deepest level (8 for the encoder); 1 for the decoder."""
        self.tile = tile
        self.halo = halo
        self.storage = storage
        self.on_progress = on_progress
        self.stage = stage
        self.statistics = statistics
        self.sample = sample
        """How many tiles the "sampled" statistics are measured on."""

    def _output_scale(self) -> float:
        return self._scale_change(self.ops)

    def _tiles(self, x: torch.Tensor, storage: torch.device) -> list[_Tile]:
        height, width = x.shape[-2:]
        scale = self._output_scale()
        to_out = (lambda v: v * round(scale)) if scale >= 1 else (lambda v: v // round(1 / scale))
        if self.statistics == "vaehook":
            rows, cols = _vaehook_spans(height, self.tile, self.halo), _vaehook_spans(width, self.tile, self.halo)
        else:
            rows, cols = _spans(height, self.tile, self.halo, self.align), _spans(width, self.tile, self.halo, self.align)
        tiles = []
        for y0, y1, ylo, yhi in rows:
            for x0, x1, xlo, xhi in cols:
                stats = None if self.statistics == "vaehook" else (y0, y1, x0, x1)
                out = tuple(to_out(v) for v in (y0, y1, x0, x1))
                tiles.append(_Tile((ylo, xlo), stats, out, x[..., ylo:yhi, xlo:xhi].to(storage)))
        return tiles

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        storage = self.storage or x.device
        tiles = self._tiles(x, storage)
        if self.statistics == "sampled":
            return self._run_sampled(x, tiles, storage)
        scale = self._lockstep(tiles, x.device, storage, None, (0, len(tiles) * (len(self._barriers()) + 1)))
        return self._assemble(tiles, x, scale)

    def _barriers(self) -> list[int]:
        kinds = ("gn", "attn") if self.statistics in ("exact", "sampled") else ("gn",)
        return [i for i, op in enumerate(self.ops) if op[0] in kinds]

    def _lockstep(self, tiles: list[_Tile], device: torch.device, storage: torch.device, recorded: dict[int, Any] | None,
                  progress: tuple[int, int]) -> float:
        """Runs all operations over `tiles` in lockstep (outputs left in tile.x); returns the output scale.
        `recorded` receives the shared statistics / keys and values used at each barrier."""
        barriers = self._barriers()
        segments = len(barriers) + 1
        scale = 1.0
        start = 0
        pending: Op | None = None
        shared: Any = None
        for segment in range(segments):
            stop = barriers[segment] if segment < len(barriers) else len(self.ops)
            body = self.ops[start:stop]
            barrier = self.ops[stop] if stop < len(self.ops) else None
            end_scale = scale * self._scale_change(body)
            gathered: list[Any] = []
            for index, tile in enumerate(tiles):
                current = tile.x.to(device)
                tile.x = None
                current = self._apply_pending(pending, shared, current)
                current = self._run(body, tile, current, device, storage)
                if barrier is not None:
                    region = self._stats_region(tile, current, end_scale)
                    if barrier[0] == "gn":
                        gathered.append(_group_stats(region, barrier[1].num_groups))
                    else:
                        gathered.append(self._keys_values(barrier[1], region))
                tile.x = current.to(storage)
                del current
                report(self.on_progress, self.stage, progress[0] + segment * len(tiles) + index + 1, progress[1])
            if barrier is not None:
                if barrier[0] == "attn":
                    shared = (torch.cat([k for k, _ in gathered], dim=2), torch.cat([v for _, v in gathered], dim=2))
                else:
                    shared = _combine(gathered) if self.statistics != "vaehook" else _combine_vaehook(gathered)
                if recorded is not None:
                    recorded[stop] = shared
            pending, scale, start = barrier, end_scale, stop + 1
        return scale

    def _walk(self, x: torch.Tensor, tile: _Tile, replay: dict[int, Any]) -> torch.Tensor:
        """All operations on one tile alone, each GroupNorm and attention using the recorded values."""
        for index, op in enumerate(self.ops):
            if op[0] in ("gn", "attn"):
                x = _normalize(x, op[1], *replay[index]) if op[0] == "gn" else _attend(op[1], x, *replay[index])
            else:
                x = self._run([op], tile, x, x.device, x.device)
        return x

    def _run_sampled(self, x: torch.Tensor, tiles: list[_Tile], storage: torch.device) -> torch.Tensor:
        """Tiles one after another, normalised with statistics measured on a spread-out sample of them.

        The lockstep scheme keeps every tile's activations alive between operations; on a CPU they all
        live in the same RAM, so host memory grows with the image (930 vs 1032 MB untiled at 1024 px,
        docs/diffusion.md). Here `sample` tiles spread over the image (a 2 x 2 choice of rows and
        columns by default) first run in lockstep, recording every GroupNorm's mean/variance (exact
        over their cores) and the mid-block attention's keys and values; then every tile runs through
        the whole network alone with those values, and only its core is kept. Peak memory is the
        sample's working set plus the output, whatever the image size. The statistics are estimates
        from part of the image at its own scale; they are the same for every tile, so there are no
        seams. With all tiles sampled this is the exact mode.
        """
        rows = sorted({t.stats[0] for t in tiles})
        cols = sorted({t.stats[2] for t in tiles})
        per_axis = max(1, math.isqrt(self.sample))
        pick = lambda values: {values[min(len(values) - 1, int((i + 0.5) * len(values) / min(per_axis, len(values))))]
                               for i in range(min(per_axis, len(values)))}
        chosen_rows, chosen_cols = pick(rows), pick(cols)
        sample = [_Tile(t.origin, t.stats, t.out, t.x) for t in tiles if t.stats[0] in chosen_rows and t.stats[2] in chosen_cols]
        recorded: dict[int, Any] = {}
        lockstep_units = len(sample) * (len(self._barriers()) + 1)
        total = lockstep_units + len(tiles)
        self._lockstep(sample, x.device, storage, recorded, (0, total))
        del sample
        for index, tile in enumerate(tiles):
            tile.x = self._walk(tile.x.to(x.device), tile, recorded).to(storage)
            report(self.on_progress, self.stage, lockstep_units + index + 1, total)
        return self._assemble(tiles, x, self._output_scale())

    @staticmethod
    def _scale_change(ops: list[Op]) -> float:
        factor = 1.0
        for op in ops:
            factor *= 0.5 if op[0] == "down" else 2.0 if op[0] == "up" else 1.0
        return factor

    @staticmethod
    def _stats_region(tile: _Tile, x: torch.Tensor, scale: float) -> torch.Tensor:
        if tile.stats is None:
            return x
        y0, y1, x0, x1 = (round((v - o) * scale) for v, o in zip(tile.stats, (tile.origin[0],) * 2 + (tile.origin[1],) * 2))
        return x[..., y0:y1, x0:x1]

    @staticmethod
    def _keys_values(attn: torch.nn.Module, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = _tokens(region)
        return _split_heads(attn, attn.to_k(tokens)), _split_heads(attn, attn.to_v(tokens))

    def _apply_pending(self, pending: Op | None, shared: Any, x: torch.Tensor) -> torch.Tensor:
        if pending is None:
            return x
        if pending[0] == "gn":
            return _normalize(x, pending[1], *shared, eps=1e-6 if self.statistics == "vaehook" else None)
        return _attend(pending[1], x, *shared)

    def _run(self, body: list[Op], tile: _Tile, x: torch.Tensor, device: torch.device, storage: torch.device) -> torch.Tensor:
        for op in body:
            kind = op[0]
            if kind in ("module", "down", "up"):
                x = op[1](x)
            elif kind == "attn":  # only reached in vaehook mode: each tile attends to itself
                x = _attend(op[1], x, *self._keys_values(op[1], x))
            elif kind == "push":
                tile.stack.append(x.to(storage))
            elif kind == "pop_add":
                residual = tile.stack.pop().to(device)
                if op[1] is not None:
                    residual = op[1](residual)
                x = (residual + x) / op[2]
            else:
                raise AssertionError(f"unexpected operation {kind}")
        return x

    @staticmethod
    def _assemble(tiles: list[_Tile], x: torch.Tensor, scale: float) -> torch.Tensor:
        first = tiles[0].x
        to_out = (lambda v: v * round(scale)) if scale >= 1 else (lambda v: v // round(1 / scale))
        height, width = (to_out(v) for v in x.shape[-2:])
        out = torch.empty(first.shape[0], first.shape[1], height, width, dtype=first.dtype, device=x.device)
        for tile in tiles:
            y0, y1, x0, x1 = tile.out
            oy, ox = (to_out(v) for v in tile.origin)
            out[..., y0:y1, x0:x1] = tile.x[..., y0 - oy : y1 - oy, x0 - ox : x1 - ox].to(x.device)
        return out


def _storage(device: torch.device, offload: bool | None) -> torch.device:
    if offload is None:
        offload = device.type != "cpu"
    return torch.device("cpu") if offload else device


def _fits(x: torch.Tensor, tile: int, halo: int, statistics: str) -> bool:
    """Whether the input is run untiled (vaehook also skips inputs up to tile + 2 * pad)."""
    return max(x.shape[-2:]) <= (tile + 2 * halo if statistics == "vaehook" else tile)


def _downscale(encoder: torch.nn.Module) -> int:
    return 2 ** sum(1 for block in encoder.down_blocks if block.downsamplers)


@torch.no_grad()
def tiled_encoder(encoder: torch.nn.Module, image: torch.Tensor, tile: int = 512, halo: int = 64, offload: bool | None = None,
                  on_progress: OptionalCallback = None, statistics: str = "exact", sample: int = 4) -> torch.Tensor:
    """`encoder(image)` computed in tiles of `tile` image pixels (multiples of the downscale factor)."""
    if _fits(image, tile, halo, statistics):
        return encoder(image)
    runner = TiledVAERunner(encoder_ops(encoder), _downscale(encoder), tile, halo, _storage(image.device, offload), on_progress,
                            "vae_encode", statistics, sample)
    return runner(image)


@torch.no_grad()
def tiled_decoder(decoder: torch.nn.Module, latent: torch.Tensor, tile: int = 64, halo: int = 11, offload: bool | None = None,
                  on_progress: OptionalCallback = None, statistics: str = "exact", sample: int = 4) -> torch.Tensor:
    """`decoder(latent)` computed in tiles of `tile` latent pixels."""
    if _fits(latent, tile, halo, statistics):
        return decoder(latent)
    runner = TiledVAERunner(decoder_ops(decoder), 1, tile, halo, _storage(latent.device, offload), on_progress, "vae_decode",
                            statistics, sample)
    return runner(latent)


class tiled_vae:
    """Within the block, `vae.encode` / `vae.decode` (and pipelines that call them) run tiled.

    ``with tiled_vae(vae, encoder_tile=512, decoder_tile=64): latents = vae.encode(x).latent_dist.sample()``
    Inputs no larger than a tile take the module's own path, so small images are computed exactly as before.
    """

    def __init__(self, vae: torch.nn.Module, encoder_tile: int = 512, decoder_tile: int = 64, encoder_halo: int = 64,
                 decoder_halo: int = 11, offload: bool | None = None, on_progress: OptionalCallback = None,
                 statistics: str = "exact", sample: int = 4):
        self.vae = vae
        self.settings = (encoder_tile, decoder_tile, encoder_halo, decoder_halo, offload, on_progress, statistics, sample)
        self._saved: list[tuple[torch.nn.Module, Callable]] = []

    def __enter__(self) -> tiled_vae:  # noqa: PYI034 - Self needs Python 3.11
        encoder_tile, decoder_tile, encoder_halo, decoder_halo, offload, on_progress, statistics, sample_tiles = self.settings
        encoder, decoder = self.vae.encoder, self.vae.decoder
        plain_encoder, plain_decoder = encoder.forward, decoder.forward
        self._saved = [(encoder, plain_encoder), (decoder, plain_decoder)]

        def encode(image: torch.Tensor) -> torch.Tensor:
            if _fits(image, encoder_tile, encoder_halo, statistics):
                return plain_encoder(image)
            runner = TiledVAERunner(encoder_ops(encoder), _downscale(encoder), encoder_tile, encoder_halo,
                                    _storage(image.device, offload), on_progress, "vae_encode", statistics, sample_tiles)
            with torch.no_grad():
                return runner(image)

        def decode(latent: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
            if latent_embeds is not None or _fits(latent, decoder_tile, decoder_halo, statistics):
                return plain_decoder(latent, latent_embeds)
            runner = TiledVAERunner(decoder_ops(decoder), 1, decoder_tile, decoder_halo, _storage(latent.device, offload),
                                    on_progress, "vae_decode", statistics, sample_tiles)
            with torch.no_grad():
                return runner(latent)

        encoder.forward = encode
        decoder.forward = decode
        return self

    def __exit__(self, *exc: object) -> None:
        for module, forward in self._saved:
            module.forward = forward
        self._saved = []
