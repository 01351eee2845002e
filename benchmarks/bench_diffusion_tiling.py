"""Peak memory and time of tiled vs untiled VAE decoding and latent denoising, for a few sizes.

Each measurement runs in a fresh subprocess, so its peak memory is its own: on a GPU the peak of
torch.cuda.max_memory_allocated, on the CPU the growth of the process's peak resident set over the
loaded model. Weights are random (the cost does not depend on their values); `--full-size` uses
the real SD VAE/UNet widths, the default a quarter-width VAE and the tiny UNet so the CPU run is
short.

    PYTHONPATH=. python benchmarks/bench_diffusion_tiling.py [--device cuda] [--full-size]
    PYTHONPATH=. python benchmarks/bench_diffusion_tiling.py --accuracy

VAE modes: untiled; tiled (lockstep, exact statistics: device memory bounded, host memory not);
sampled (tiles one at a time with statistics from 4 sampled tiles: host memory bounded too).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _peak_mb(device: torch.device, baseline_kb: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024


def _build(kind: str, full_size: bool, device: torch.device, dtype: torch.dtype):
    from diffsr.diffusion.bases import BASES
    from diffsr.diffusion.tiny import tiny_unet, tiny_vae

    real = {k: v for k, v in BASES["sd21-base"].vae.items() if not k.startswith("_")}
    quarter = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 2, "norm_num_groups": 32}
    if kind == "vae":
        model = tiny_vae(seed=0, **(real if full_size else quarter))
    else:
        unet = {k: v for k, v in BASES["sd21-base"].unet.items() if not k.startswith("_")}
        model = tiny_unet(seed=0, **(unet if full_size else {}))
    return model.to(device=device, dtype=dtype).eval()


def measure(kind: str, mode: str, size: int, tile: int, full_size: bool, device_name: str, dtype_name: str) -> dict:
    """One measurement (run in a subprocess by `main`)."""
    from diffsr.latent_tiling import tiled_map
    from diffsr.vae_tiling import tiled_decoder

    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    model = _build(kind, full_size, device, dtype)
    latent = torch.randn(1, 4, size, size, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.no_grad():
        if kind == "vae":
            if mode == "untiled":
                out = model.decoder(latent)
            else:
                out = tiled_decoder(model.decoder, latent, tile=tile, statistics="exact" if mode == "tiled" else "sampled")
        else:
            context = torch.randn(1, 77, model.config.cross_attention_dim, device=device, dtype=dtype)
            step = lambda x: model(x, 999, encoder_hidden_states=context.expand(x.shape[0], -1, -1)).sample
            out = tiled_map(step, {"x": latent}, tile, tile // 2, "stablesr", batch_size=4) if mode == "tiled" else step(latent)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"kind": kind, "mode": mode, "latent": size, "tile": tile, "seconds": round(seconds, 3),
            "peak_mb": round(_peak_mb(device, baseline), 1), "out_mean_abs": float(out.float().abs().mean())}


def _independent_tiles(module, x, tile: int, halo: int, align: int, scale: float) -> torch.Tensor:
    """Each tile run on its own (its own GroupNorm statistics and attention), cores pasted: the seam-prone baseline."""
    from diffsr.vae_tiling import _spans

    out = None
    for y0, y1, ylo, yhi in _spans(x.shape[-2], tile, halo, align):
        for x0, x1, xlo, xhi in _spans(x.shape[-1], tile, halo, align):
            part = module(x[..., ylo:yhi, xlo:xhi])
            if out is None:
                out = torch.zeros(*part.shape[:2], int(x.shape[-2] * scale), int(x.shape[-1] * scale))
            s = lambda v, o=0: int((v - o) * scale)
            out[..., s(y0):s(y1), s(x0):s(x1)] = part[..., s(y0, ylo):s(y1, ylo), s(x0, xlo):s(x1, xlo)]
    return out


@torch.no_grad()
def accuracy() -> None:
    """Tiled minus untiled on the tiny random VAE, for several halos: shared statistics vs independent tiles."""
    from diffsr.diffusion.tiny import tiny_vae
    from diffsr.vae_tiling import tiled_decoder, tiled_encoder

    vae = tiny_vae(seed=0)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 256, 256, generator=gen) * 2 - 1
    latent = torch.randn(1, 4, 64, 64, generator=gen)
    print("accuracy, tiny random VAE (|tiled - untiled| max / mean; outputs reach ~1-2)")
    print(f"{'part':<9}{'tile':>5}{'halo':>6}{'shared stats':>24}{'sampled (4 tiles)':>24}{'independent tiles':>24}")
    cases = [("encoder", vae.encoder, image, 64, halo, 8, 1 / 8, tiled_encoder) for halo in (16, 32)]
    cases += [("decoder", vae.decoder, latent, 16, halo, 1, 8, tiled_decoder) for halo in (4, 8, 11)]
    for name, module, x, tile, halo, align, scale, tiled in cases:
        reference = module(x)
        shared = (tiled(module, x, tile=tile, halo=halo) - reference).abs()
        sampled = (tiled(module, x, tile=tile, halo=halo, statistics="sampled") - reference).abs()
        alone = (_independent_tiles(module, x, tile, halo, align, scale) - reference).abs()
        print(f"{name:<9}{tile:>5}{halo:>6}" + "".join(f"{e.max():>13.2e} / {e.mean():.2e}" for e in (shared, sampled, alone)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--sizes", default="32,64,128", help="latent sizes (image = 8x)")
    parser.add_argument("--vae-tile", type=int, default=64, help="decoder tile (latent pixels)")
    parser.add_argument("--unet-tile", type=int, default=32, help="latent tile of the denoiser")
    parser.add_argument("--accuracy", action="store_true", help="only print the tiled-vs-untiled accuracy table")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    if args.accuracy:
        accuracy()
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"device {args.device}, {args.dtype}, {'full-size' if args.full_size else 'reduced'} models; peak = "
          f"{'CUDA max allocated' if args.device.startswith('cuda') else 'growth of peak RSS over the loaded model'}")
    print(f"{'part':<8}{'mode':<9}{'latent':>7}{'image':>7}{'tile':>6}{'seconds':>9}{'peak MB':>9}")
    for kind, tile in (("vae", args.vae_tile), ("unet", args.unet_tile)):
        for size in sizes:
            for mode in ("untiled", "tiled", "sampled") if kind == "vae" else ("untiled", "tiled"):
                job = json.dumps([kind, mode, size, tile, args.full_size, args.device, args.dtype])
                result = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True, check=True)
                row = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"{kind:<8}{mode:<9}{size:>7}{size * 8:>7}{tile:>6}{row['seconds']:>9.2f}{row['peak_mb']:>9.1f}")


if __name__ == "__main__":
    main()
