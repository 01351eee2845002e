"""StableSR speed and peak memory, SD 2.1-base architecture with random weights (speed and memory do not
depend on the values), nothing downloaded.

Two parts:

- speed: seconds per denoising call (time-aware encoder + UNet on one 64 x 64 latent tile, i.e. one
  step of a 512 x 512 image), per VAE encode and CFW decode of 512 x 512, and from them the seconds
  per 512^2 image at 200 steps (the README's setting) and 4 steps (turbo);
- memory: peak RSS growth (CPU) or peak CUDA memory of a whole `upscale` (1 step) at two output sizes,
  in tile mode (pixel patches of --pixel-tile, latent tiles of 64) and as one untiled canvas (pixel_tile
  0, VAE tiling off). Each configuration runs in its own process, so peaks do not mix.

    PYTHONPATH=. python benchmarks/bench_stablesr.py                        # full size, CPU, fp32
    PYTHONPATH=. python benchmarks/bench_stablesr.py --device cuda --dtype fp16
    PYTHONPATH=. python benchmarks/bench_stablesr.py --reduced --parts memory --sizes 128 256 --pixel-tile 128 --pixel-stride 128

`--reduced` divides the widths (UNet by 5, VAE and encoder by 4; same depth and layout), for machines
without the ~6 GB the full-size fp32 models need. Paper's figure for comparison: about 10-15 s per 512^2
image at 200 steps on a V100 (fp16); issue #111: ~30 s on an RTX 3090.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(device: str, dtype: str, reduced: bool):
    """A StableSR pipeline of the real (or uniformly reduced) sizes with random weights."""
    import diffusers

    from diffsr.diffusion.bases import BASES
    from diffsr.diffusion.runtime import Runtime
    from diffsr.models.stablesr import CFW, EncoderLayout, StableSRAdapter, unet_resnet_names
    from diffsr.pipelines.stablesr import StableSRModels, StableSRPipeline

    spec = BASES["sd21-base"]
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    unet_config, vae_config = strip(spec.unet), strip(spec.vae)
    encoder = EncoderLayout.official()
    if reduced:
        unet_config.update(block_out_channels=[64, 128, 256, 256], attention_head_dim=[1, 2, 4, 4])
        vae_config.update(block_out_channels=[32, 64, 128, 128])
        encoder = EncoderLayout.official(model_channels=64, out_channels=64)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(unet_config)
    vae = diffusers.AutoencoderKL.from_config(vae_config)
    adapter = StableSRAdapter(encoder, {n: r.conv2.out_channels for n, r in unet_resnet_names(unet).items()})
    widths = {level: vae.encoder.down_blocks[level].resnets[-1].conv2.out_channels for level in (1, 2)}
    cfw = CFW(widths, blocks=2)
    context = torch.randn(1, 77, unet_config["cross_attention_dim"]) * 0.1
    runtime = Runtime.from_options({"device": device, "dtype": dtype})
    models = StableSRModels(unet, vae, adapter, context, "epsilon", 512, cfw)
    return StableSRPipeline(models, runtime)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed(args: argparse.Namespace) -> dict:
    from diffsr.diffusion.runtime import NoiseSource

    pipeline = build(args.device, args.dtype, args.reduced)
    device = pipeline.device
    lr = torch.rand(1, 4, 64, 64) * 2 - 1
    image = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        pipeline.model_output(torch.randn(1, 4, 64, 64), lr, 999)  # warm-up
        _sync(device)
        started = time.perf_counter()
        for t in (999, 500):
            pipeline.model_output(torch.randn(1, 4, 64, 64), lr, t)
        _sync(device)
        per_call = (time.perf_counter() - started) / 2
        started = time.perf_counter()
        latent, features = pipeline.encode(image, NoiseSource(seed=0))
        _sync(device)
        encode = time.perf_counter() - started
        started = time.perf_counter()
        pipeline.decode(latent, features, 0.5)
        _sync(device)
        decode = time.perf_counter() - started
    return {"part": "speed", "seconds_per_step_512": round(per_call, 3), "vae_encode_512": round(encode, 3),
            "cfw_decode_512": round(decode, 3), "image_512_200_steps": round(encode + decode + 200 * per_call, 1),
            "image_512_4_steps": round(encode + decode + 4 * per_call, 2)}


def memory(args: argparse.Namespace, size: int, mode: str) -> dict:
    """One upscale of a random LR to `size` x `size` output (1 step) in its own process."""
    from diffsr.io.image import ImageData

    pipeline = build(args.device, args.dtype, args.reduced)
    device = pipeline.device
    lr = np.random.default_rng(0).random((size // 4, size // 4, 3), dtype=np.float32)
    options = {"steps": 1, "seed": 0, "upscale": 4.0, "input_size": 64, "color_fix": "adain"}
    if mode == "tiled":
        options.update(pixel_tile=args.pixel_tile, pixel_stride=args.pixel_stride or args.pixel_tile * 3 // 4, vae_tiling=True)
    else:
        options.update(pixel_tile=0, vae_tiling=False, latent_tile=size // 8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = _rss_mb()
    started = time.perf_counter()
    out = pipeline.upscale(ImageData(lr), **options)
    seconds = time.perf_counter() - started
    row = {"part": "memory", "mode": mode, "output": f"{out.width}x{out.height}", "seconds": round(seconds, 1),
           "peak_rss_growth_mb": round(_rss_mb() - before, 1)}
    if device.type == "cuda":
        row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--reduced", action="store_true", help="widths divided by 5 (UNet) / 4 (VAE, encoder)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="output sizes for the memory part")
    parser.add_argument("--pixel-tile", type=int, default=512)
    parser.add_argument("--pixel-stride", type=int, default=0, help="default: 3/4 of the pixel tile")
    parser.add_argument("--parts", nargs="+", default=["speed", "memory"], choices=["speed", "memory"])
    parser.add_argument("--modes", nargs="+", default=["tiled", "untiled"], choices=["tiled", "untiled"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.worker:
        kind, *rest = args.worker.split(":")
        row = speed(args) if kind == "speed" else memory(args, int(rest[0]), rest[1])
        print("ROW " + json.dumps(row), flush=True)
        return
    jobs = (["speed"] if "speed" in args.parts else []) + (
        [f"memory:{s}:{m}" for m in args.modes for s in args.sizes] if "memory" in args.parts else [])
    for job in jobs:
        command = [sys.executable, __file__, "--worker", job, "--device", args.device, "--dtype", args.dtype,
                   "--pixel-tile", str(args.pixel_tile), "--pixel-stride", str(args.pixel_stride)] + (["--reduced"] if args.reduced else [])
        result = subprocess.run(command, capture_output=True, text=True)
        rows = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
        print(rows[0] if rows else json.dumps({"job": job, "error": result.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
