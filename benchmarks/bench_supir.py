"""SUPIR's denoiser at full size (SDXL UNet + GLVControl + 12 connectors, random weights): seconds per step and peak memory.

NON-COMMERCIAL architecture (diffsr.noncommercial). One sampler step = one network evaluation on the
doubled CFG batch per latent tile, as `diffsr upscale --method supir` runs it. Each size is measured
in a fresh subprocess, so its peak is its own: on a GPU torch.cuda.max_memory_allocated, on the CPU
the growth of the peak resident set over the loaded model. With tiled sampling the peak depends on
the tile, not on the image: sizes above one tile should show the same peak and proportionally more time.

    PYTHONPATH=. python benchmarks/bench_supir.py                                   # CPU: 256 and 512 px, tile 32
    PYTHONPATH=. python benchmarks/bench_supir.py --device cuda --dtype fp16 --sizes 1024 2048 --tile 128 --overlap 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(device: torch.device, dtype: torch.dtype):
    """The full-size SUPIR denoiser with random weights, allocated once in the target dtype (no fp32 copy)."""
    from diffusers import UNet2DConditionModel

    from diffsr.diffusion.bases import BASES
    from diffsr.noncommercial.supir.models import GLVControl, SUPIRDenoiser, build_project_modules

    config = {k: v for k, v in BASES["sdxl-base"].unet.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        project = build_project_modules(tuple(config["block_out_channels"]))
    denoiser = SUPIRDenoiser(unet, GLVControl(config), project).to(dtype).to_empty(device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(dtype) * fan_in**-0.5)
    denoiser.eval().requires_grad_(False)
    denoiser.set_attention("sdpa")
    return denoiser, sum(p.numel() for p in denoiser.parameters())


def _peak_mb(device: torch.device, baseline_kb: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024


def measure(size: int, tile: int, overlap: int, steps: int, device_name: str, dtype_name: str) -> dict:
    """One size (run in a subprocess by `main`)."""
    from diffsr.diffusion.runtime import NoiseSource
    from diffsr.noncommercial.supir.sampling import RestoreEDM, SamplerSettings

    device = torch.device(device_name)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    started = time.perf_counter()
    denoiser, params = build(device, dtype)
    load_s = time.perf_counter() - started
    latent = size // 8
    context = torch.randn(1, 77, 2048, device=device)
    vector = torch.randn(1, 2816, device=device)

    def eps_fn(x_in, timesteps, control, control_scale):
        n = x_in.shape[0]
        return denoiser(x_in, timesteps, context.expand(n, -1, -1), vector.expand(n, -1), control, control_scale)

    noise = NoiseSource(seed=0)
    z = torch.randn(1, 4, latent, latent, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = 0
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    marks = [time.perf_counter()]

    def on_step(i, x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    sampler = RestoreEDM(SamplerSettings(steps=steps))
    with torch.no_grad():
        out = sampler.sample(eps_fn, z, z, z, noise, tile=tile, overlap=overlap, on_step=on_step)
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    return {"size": size, "latent": latent, "tile": tile, "overlap": overlap, "device": device.type, "dtype": dtype_name,
            "params": params, "load_s": round(load_s, 1), "first_step_s": round(per_step[0], 2),
            "step_s": round(min(per_step[1:] or per_step), 2), "peak_mb": round(_peak_mb(device, baseline), 1),
            "finite": bool(torch.isfinite(out).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels (square)")
    parser.add_argument("--tile", type=int, default=32, help="latent tile (official 128)")
    parser.add_argument("--overlap", type=int, default=16, help="latent overlap (official 64)")
    parser.add_argument("--steps", type=int, default=2, help="steps per size (the fastest after the first is reported)")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.tile, args.overlap, args.steps, args.device, args.dtype)))
        return
    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--measure", str(size), "--device", args.device, "--dtype", args.dtype,
                   "--tile", str(args.tile), "--overlap", str(args.overlap), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            print(f"size {size}: failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| image | latent | tiles of | device | dtype | s / step | first step s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['latent']} | {r['tile']} (overlap {r['overlap']}) | {r['device']} | {r['dtype']} | "
              f"{r['step_s']} | {r['first_step_s']} | {r['peak_mb']} |")
    if rows:
        print(f"parameters: {rows[0]['params']:,}; random weights, outputs finite: {all(r['finite'] for r in rows)}")


if __name__ == "__main__":
    main()
