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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from diffsr.progress import OptionalCallback, report

Op = tuple[Any, ...]
QUERY_CHUNK = 4096


@dataclass
class _Tile:
    origin: tuple[int, int]
    """Top-left input pixel of the window the tile computes (core plus halo, clipped to the image)."""
    core: tuple[int, int, int, int]
    """y0, y1, x0, x1 of the part this tile owns, in input pixels."""
    x: torch.Tensor | None = None
    stack: list[torch.Tensor] = field(default_factory=list)
    stats: tuple[torch.Tensor, torch.Tensor, int] | None = None


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


def _normalize(x: torch.Tensor, norm: torch.nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    g = norm.num_groups
    flat = x.float().reshape(n, g, -1)
    flat = (flat - mean.float()[:, :, None]) * torch.rsqrt(var.float()[:, :, None] + norm.eps)
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


class TiledVAERunner:
    """Runs a VAE encoder or decoder over tiles with shared normalisation; see the module docstring."""

    def __init__(self, ops: list[Op], scale_in: int, tile: int, halo: int, storage: torch.device | None = None,
                 on_progress: OptionalCallback = None, stage: str = "vae"):
        self.ops = ops
        self.align = scale_in
        """Input pixels per output pixel at the deepest level (8 for the encoder); 1 for the decoder."""
        self.tile = tile
        self.halo = halo
        self.storage = storage
        self.on_progress = on_progress
        self.stage = stage

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device
        storage = self.storage or device
        height, width = x.shape[-2:]
        rows = _spans(height, self.tile, self.halo, self.align)
        cols = _spans(width, self.tile, self.halo, self.align)
        tiles = [_Tile((ylo, xlo), (y0, y1, x0, x1), x[..., ylo:yhi, xlo:xhi].to(storage))
                 for (y0, y1, ylo, yhi) in rows for (x0, x1, xlo, xhi) in cols]
        barriers = [i for i, op in enumerate(self.ops) if op[0] in ("gn", "attn")]
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
                    core = self._core(tile, current, end_scale)
                    if barrier[0] == "gn":
                        gathered.append(_group_stats(core, barrier[1].num_groups))
                    else:
                        gathered.append(self._keys_values(barrier[1], core))
                tile.x = current.to(storage)
                del current
                report(self.on_progress, self.stage, segment * len(tiles) + index + 1, segments * len(tiles))
            if barrier is not None:
                if barrier[0] == "gn":
                    shared = _combine(gathered)
                else:
                    shared = (torch.cat([k for k, _ in gathered], dim=2), torch.cat([v for _, v in gathered], dim=2))
            pending, scale, start = barrier, end_scale, stop + 1
        return self._assemble(tiles, x, scale, storage)

    @staticmethod
    def _scale_change(ops: list[Op]) -> float:
        factor = 1.0
        for op in ops:
            factor *= 0.5 if op[0] == "down" else 2.0 if op[0] == "up" else 1.0
        return factor

    def _core(self, tile: _Tile, x: torch.Tensor, scale: float) -> torch.Tensor:
        y0, y1, x0, x1 = (round((v - o) * scale) for v, o in zip(tile.core, (tile.origin[0],) * 2 + (tile.origin[1],) * 2))
        return x[..., y0:y1, x0:x1]

    def _keys_values(self, attn: torch.nn.Module, core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = _tokens(core)
        return _split_heads(attn, attn.to_k(tokens)), _split_heads(attn, attn.to_v(tokens))

    @staticmethod
    def _apply_pending(pending: Op | None, shared: Any, x: torch.Tensor) -> torch.Tensor:
        if pending is None:
            return x
        if pending[0] == "gn":
            return _normalize(x, pending[1], *shared)
        return _attend(pending[1], x, *shared)

    @staticmethod
    def _run(body: list[Op], tile: _Tile, x: torch.Tensor, device: torch.device, storage: torch.device) -> torch.Tensor:
        for op in body:
            kind = op[0]
            if kind in ("module", "down", "up"):
                x = op[1](x)
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

    def _assemble(self, tiles: list[_Tile], x: torch.Tensor, scale: float, storage: torch.device) -> torch.Tensor:
        first = tiles[0].x
        height, width = (round(v * scale) for v in x.shape[-2:])
        out = torch.empty(first.shape[0], first.shape[1], height, width, dtype=first.dtype, device=x.device)
        for tile in tiles:
            y0, y1, x0, x1 = (round(v * scale) for v in tile.core)
            out[..., y0:y1, x0:x1] = self._core(tile, tile.x, scale).to(x.device)
        return out


def _storage(device: torch.device, offload: bool | None) -> torch.device:
    if offload is None:
        offload = device.type != "cpu"
    return torch.device("cpu") if offload else device


def _downscale(encoder: torch.nn.Module) -> int:
    return 2 ** sum(1 for block in encoder.down_blocks if block.downsamplers)


@torch.no_grad()
def tiled_encoder(encoder: torch.nn.Module, image: torch.Tensor, tile: int = 512, halo: int = 64, offload: bool | None = None,
                  on_progress: OptionalCallback = None) -> torch.Tensor:
    """`encoder(image)` computed in tiles of `tile` image pixels (multiples of the downscale factor)."""
    factor = _downscale(encoder)
    if max(image.shape[-2:]) <= tile:
        return encoder(image)
    runner = TiledVAERunner(encoder_ops(encoder), factor, tile, halo, _storage(image.device, offload), on_progress, "vae_encode")
    return runner(image)


@torch.no_grad()
def tiled_decoder(decoder: torch.nn.Module, latent: torch.Tensor, tile: int = 64, halo: int = 11, offload: bool | None = None,
                  on_progress: OptionalCallback = None) -> torch.Tensor:
    """`decoder(latent)` computed in tiles of `tile` latent pixels."""
    if max(latent.shape[-2:]) <= tile:
        return decoder(latent)
    runner = TiledVAERunner(decoder_ops(decoder), 1, tile, halo, _storage(latent.device, offload), on_progress, "vae_decode")
    return runner(latent)


class tiled_vae:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, `vae.encode` / `vae.decode` (and pipelines that call them) run tiled.

    ``with tiled_vae(vae, encoder_tile=512, decoder_tile=64): latents = vae.encode(x).latent_dist.sample()``
    Inputs no larger than a tile take the module's own path, so small images are computed exactly as before.
    """

    def __init__(self, vae: torch.nn.Module, encoder_tile: int = 512, decoder_tile: int = 64, encoder_halo: int = 64,
                 decoder_halo: int = 11, offload: bool | None = None, on_progress: OptionalCallback = None):
        self.vae = vae
        self.settings = (encoder_tile, decoder_tile, encoder_halo, decoder_halo, offload, on_progress)
        self._saved: list[tuple[torch.nn.Module, Callable]] = []

    def __enter__(self) -> "tiled_vae":
        encoder_tile, decoder_tile, encoder_halo, decoder_halo, offload, on_progress = self.settings
        encoder, decoder = self.vae.encoder, self.vae.decoder
        plain_encoder, plain_decoder = encoder.forward, decoder.forward
        self._saved = [(encoder, plain_encoder), (decoder, plain_decoder)]

        def encode(sample: torch.Tensor) -> torch.Tensor:
            if max(sample.shape[-2:]) <= encoder_tile:
                return plain_encoder(sample)
            runner = TiledVAERunner(encoder_ops(encoder), _downscale(encoder), encoder_tile, encoder_halo,
                                    _storage(sample.device, offload), on_progress, "vae_encode")
            with torch.no_grad():
                return runner(sample)

        def decode(sample: torch.Tensor, latent_embeds: torch.Tensor | None = None) -> torch.Tensor:
            if latent_embeds is not None or max(sample.shape[-2:]) <= decoder_tile:
                return plain_decoder(sample, latent_embeds)
            runner = TiledVAERunner(decoder_ops(decoder), 1, decoder_tile, decoder_halo, _storage(sample.device, offload),
                                    on_progress, "vae_decode")
            with torch.no_grad():
                return runner(sample)

        encoder.forward = encode
        decoder.forward = decode
        return self

    def __exit__(self, *exc: object) -> None:
        for module, forward in self._saved:
            module.forward = forward
        self._saved = []
