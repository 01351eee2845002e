"""InvSR speed and peak memory per 128 -> 512 image for 1, 3 and 5 steps, next to the paper's A100 figures.

The networks have the full sizes (SD-Turbo UNet and VAE from diffsr's base configs, the released noise
predictor's 33.8M-parameter config) with random weights: the cost does not depend on the values. The
prompt is encoded once at load time (as in the pipeline), so a random 1 x 77 x 1024 context stands in for
the OpenCLIP text encoder here. Each step count runs in a fresh subprocess, so each peak is its own: on a
GPU torch.cuda.max_memory_allocated, on the CPU the growth of the peak resident set over the loaded model.

    PYTHONPATH=. python benchmarks/bench_invsr.py [--device cuda] [--dtype fp16] [--steps 1 3 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

PAPER_MS = {1: 117, 2: 149, 3: 176, 4: 207, 5: 244}
"""Table 7 of the paper: InvSR-N runtime per 128 -> 512 image on an A100-40GB (ms)."""


def _build(device: str, dtype: str):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from diffsr.diffusion.bases import BASES
    from diffsr.diffusion.runtime import Runtime
    from diffsr.models.invsr import NoisePredictor
    from diffsr.pipelines.invsr import InvSRPipeline, _Models

    spec = BASES["sd-turbo"]
    clean = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(0)
    runtime = Runtime.from_options({"device": device, "dtype": dtype})
    unet = runtime.prepare(UNet2DConditionModel.from_config(clean(spec.unet)), denoiser=True)
    vae = runtime.prepare(AutoencoderKL.from_config(clean(spec.vae)))
    scheduler = EulerDiscreteScheduler.from_config(clean(spec.scheduler))
    predictor = NoisePredictor().eval().requires_grad_(False).to(runtime.device)

    class _Bench(InvSRPipeline):
        def _encode_prompt(self) -> torch.Tensor:
            return torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(1)).to(self.runtime.device, self.dtype)

    return _Bench(_Models(unet, vae, None, None, scheduler, predictor), runtime)


def measure(steps: int, device: str, dtype: str, repeat: int, warmup: bool) -> dict:
    """One step count (run in a subprocess by `main`)."""
    from diffsr.diffusion.runtime import NoiseSource
    from diffsr.pipelines.invsr import timestep_schedule

    pipeline = _build(device, dtype)
    torch_device = pipeline.runtime.device
    lr = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    schedule = timestep_schedule(steps)
    if warmup:
        pipeline.enhance(lr, schedule, NoiseSource(seed=0))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(torch_device)
    times = []
    for index in range(repeat):
        started = time.perf_counter()
        pipeline.enhance(lr, schedule, NoiseSource(seed=index))
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if torch_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(torch_device) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return {"steps": steps, "timesteps": list(schedule), "device": torch_device.type, "dtype": str(pipeline.dtype).replace("torch.", ""),
            "seconds": min(times), "seconds_all": [round(t, 3) for t in times], "peak_mb": round(peak, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per step count (the fastest is reported)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="one untimed run first (default: on GPUs, off on the CPU)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warmup = args.device != "cpu" if args.warmup is None else args.warmup
    if args.one is not None:
        print(json.dumps(measure(args.one, args.device, args.dtype, args.repeat, warmup)))
        return
    print("| steps | timesteps | device | dtype | seconds / image | peak MB | paper (A100) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for steps in args.steps:  # each row is printed as soon as it is measured
        command = [sys.executable, __file__, "--one", str(steps), "--device", args.device, "--dtype", args.dtype,
                   "--repeat", str(args.repeat), "--warmup" if warmup else "--no-warmup"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"measurement for {steps} steps failed")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        paper = f"{PAPER_MS[row['steps']] / 1000:.3f} s" if row["steps"] in PAPER_MS else "-"
        print(f"| {row['steps']} | {row['timesteps']} | {row['device']} ({row['threads']} threads) | {row['dtype']} | "
              f"{row['seconds']:.2f} | {row['peak_mb']:.0f} | {paper} |", flush=True)


if __name__ == "__main__":
    main()
