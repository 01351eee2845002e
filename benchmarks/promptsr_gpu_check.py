"""PromptSR's one-script GPU check (research note promptsr.md, 7.3): G1 profile, G2 short training + prompt test.

    python benchmarks/promptsr_gpu_check.py --out gpu_results          # on a GPU: about 10 minutes
    python benchmarks/promptsr_gpu_check.py --smoke --out /tmp/g       # tiny sizes on the CPU: checks that it runs

G1: the default 103 M U-Net (random weights, bf16 autocast): seconds and peak memory per training step
(batch 32 of 256 px crops), and per image for DDIM at 128 -> 512 and 512 -> 2048 (tiled and untiled).
G2: the 26 M "mid" U-Net trained for `--train-minutes` on 128 px HR crops of the shared photos, degraded
on the fly by the PromptSR chain (fixed order, the note's prompt policy), then restored with DDIM 50 on
held-out B100 crops with correct / empty / swapped / describer prompts (PSNR, SSIM on Y, 4-px border; 95 % paired
bootstrap intervals) and with each noise word (high-frequency energy per word). Writes DIR/g1.json,
DIR/g2.json and DIR/g2.png. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from promptsr_evidence import SHARED, bootstrap_ci, degrade_all, laplacian_energy, load_hr  # noqa: E402

from diffsr.degrade.config import PRESETS  # noqa: E402
from diffsr.degrade.pipeline import sample_seed  # noqa: E402
from diffsr.metrics.full_reference import psnr as psnr_y  # noqa: E402
from diffsr.metrics.full_reference import ssim  # noqa: E402

SWAP_LEVEL = {"light": "heavy", "medium": "light", "heavy": "light"}


def _peak(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def g1(args: argparse.Namespace, device: torch.device) -> dict:
    """Training-step and sampling cost of the default configuration."""
    from diffsr.diffusion.runtime import Runtime
    from diffsr.models.promptsr import PhraseTableEncoder, PromptSRConfig, build_unet, predict_noise
    from diffsr.pipelines.promptsr import PromptSRPipeline

    size, batch, crop = ("tiny", 2, 32) if args.smoke else ("default", 32, 256)
    hidden = 64 if args.smoke else 384
    unet = build_unet(size, hidden, seed=0).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4)
    x, up, states = (torch.randn(batch, 3, crop, crop, device=device), torch.randn(batch, 3, crop, crop, device=device),
                     torch.randn(batch, 32, hidden, device=device))
    rows: dict = {"model": size, "parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)}
    for name, steps in (("warmup", 1), ("timed", 3)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.l1_loss(predict_noise(unet, x, up, torch.randint(0, 2000, (batch,), device=device), states).float(), x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _sync(device)
        if name == "timed":
            rows["train_step"] = {"batch": batch, "crop": crop, "seconds": round((time.perf_counter() - t0) / steps, 4),
                                  "peak_mb": _peak(device)}
    del optimizer
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    encoder = PhraseTableEncoder(hidden)
    pipe = PromptSRPipeline(unet.eval(), encoder, {}, PromptSRConfig(text_encoder=encoder.identity()), Runtime(device, dtype))
    sampling = []
    cases = [(8, 2, 0), (16, 2, 0), (16, 2, 32)] if args.smoke else [(128, 50, 0), (128, 20, 0), (512, 5, 256), (512, 5, 0)]
    for lr_size, steps, tile in cases:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        lr = torch.rand(1, 3, lr_size, lr_size)
        _sync(device)
        t0 = time.perf_counter()
        try:
            pipe(lr, "heavy noise, downsample", steps=steps, seed=0, tile=tile)
            _sync(device)
            seconds = time.perf_counter() - t0
            row = {"output": 4 * lr_size, "steps": steps, "tile": tile, "seconds": round(seconds, 3),
                   "seconds_per_step": round(seconds / steps, 4), "peak_mb": _peak(device)}
        except torch.OutOfMemoryError:
            row = {"output": 4 * lr_size, "steps": steps, "tile": tile, "out_of_memory": True}
        print("G1", row, flush=True)
        sampling.append(row)
    rows["sampling"] = sampling
    return rows


def _swap(prompt: str) -> str:
    """Every level word replaced by a wrong one (light <-> heavy, medium -> light)."""
    return ", ".join(" ".join([SWAP_LEVEL.get(w, w) for w in phrase.split(" ")]) for phrase in prompt.split(", ") if phrase)


def _per_image(metric, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The project's metric (pyiqa conventions: Y channel, 4-px border crop) per image pair."""
    to_hwc = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    return torch.tensor([metric(to_hwc(x.clamp(0, 1)), to_hwc(y), y_channel=True, crop_border=4) for x, y in zip(a, b)])


def g2(args: argparse.Namespace, device: torch.device) -> dict:
    """A short mid-size training on the full PromptSR chain, then the prompt test on held-out B100 crops."""
    from torch.utils.data import DataLoader

    from diffsr.data.folders import HRFolderDataset, collate_pairs, worker_init
    from diffsr.degrade.prompts import PromptPolicy
    from diffsr.diffusion.runtime import Runtime
    from diffsr.models.describer import DegradationDescriber
    from diffsr.models.promptsr import TRAIN_TIMESTEPS, EmbeddingCache, PromptSRConfig, build_unet, minilm_encoder, predict_noise, train_scheduler, upsample_lr
    from diffsr.pipelines.promptsr import PromptSRPipeline
    from diffsr.train.promptsr import EMA

    size, crop, batch = ("tiny", 32, 4) if args.smoke else ("mid", 128, 64)
    encoder = minilm_encoder().to(device)
    cache = EmbeddingCache(encoder)
    unet = build_unet(size, encoder.hidden_size, seed=0).to(device)
    ema = EMA(unet, 0.999)
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.lr, betas=(0.9, 0.99))
    folders = [SHARED / "train" / name for name in ("bsds500", "imagenet_half", "div2k_patches")]
    dataset = HRFolderDataset(folders, crop_size=crop, degradation=PRESETS["promptsr"], prompt_policy=PromptPolicy(), seed=0)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate_pairs,
                        num_workers=args.workers, worker_init_fn=worker_init, persistent_workers=args.workers > 0)
    scheduler = train_scheduler()
    started, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - started < args.train_minutes * 60:
        for item in loader:
            x0 = item["hr"].to(device) * 2 - 1
            noise = torch.randn_like(x0)
            t = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), device=device)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                pred = predict_noise(unet, scheduler.add_noise(x0, noise, t), upsample_lr(item["lr"].to(device)), t,
                                     cache(item["prompt"], device))
            loss = F.l1_loss(pred.float(), noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(unet)
            step += 1
            losses.append(float(loss.detach()))
            if step % 100 == 0:
                print(f"G2 step {step} loss {sum(losses[-100:]) / 100:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
            if time.perf_counter() - started >= args.train_minutes * 60:
                break
    train_seconds = time.perf_counter() - started
    model = ema.copy_to(unet).eval()
    pipe = PromptSRPipeline(model, encoder, {}, PromptSRConfig(text_encoder=encoder.identity()), Runtime(device, torch.float32))

    # held-out B100: each photo degraded once (natural chain, fixed order), a centre crop of `crop` px HR
    hr_full = load_hr(SHARED / "bench" / "b100" / "HR", args.test_images)
    lrs, records = degrade_all(hr_full, PRESETS["promptsr"], [sample_seed(2024, "g2", i) for i in range(len(hr_full))])
    describer = DegradationDescriber.load()
    described = [d.prompt for d in describer.describe_many(lrs)]
    c = crop // 4
    hr, lr = [], []
    for img, small in zip(hr_full, lrs):
        y, x = (small.shape[1] - c) // 2, (small.shape[2] - c) // 2
        lr.append(small[:, y : y + c, x : x + c])
        hr.append(img[:, 4 * y : 4 * (y + c), 4 * x : 4 * (x + c)])
    hr, lr = torch.stack(hr), torch.stack(lr)
    truth = [r.prompt() for r in records]
    prompts = {"correct": truth, "empty": [""] * len(truth), "swapped": [_swap(p) for p in truth], "describer": described}
    steps = 2 if args.smoke else 50

    def run(texts: list[str]) -> torch.Tensor:
        return torch.cat([pipe(lr[i : i + 50], texts[i : i + 50], steps=steps, seed=i, tile=0).cpu() for i in range(0, len(texts), 50)])

    outputs = {name: run(texts) for name, texts in prompts.items()}
    p = {k: _per_image(psnr_y, v, hr) for k, v in outputs.items()}
    s = {k: _per_image(ssim, v, hr) for k, v in outputs.items()}
    words = {w: run([f"{w} noise, downsample" if w else "downsample"] * len(truth)) for w in ("", "light", "medium", "heavy")}

    def compare(metric: dict, a: str, b: str) -> dict:
        diff = metric[a] - metric[b]
        return {"mean": float(diff.mean()), "ci95": bootstrap_ci(diff)}

    result = {
        "model": size, "parameters_m": round(sum(q.numel() for q in model.parameters()) / 1e6, 2), "train_steps": step,
        "train_seconds": round(train_seconds, 1), "batch": batch, "hr_crop": crop, "lr": args.lr, "test_crops": len(truth),
        "final_loss_mean_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "psnr_y_mean_db": {k: float(v.mean()) for k, v in p.items()},
        "ssim_y_mean": {k: float(v.mean()) for k, v in s.items()},
        "psnr": {f"{a}_vs_{b}": compare(p, a, b) for a, b in (("correct", "empty"), ("empty", "swapped"), ("correct", "swapped"), ("describer", "empty"))},
        "ssim_y": {f"{a}_vs_{b}": compare(s, a, b) for a, b in (("correct", "empty"), ("correct", "swapped"))},
        "noise_word_hf_energy": {w or "(no noise word)": float(laplacian_energy(v).mean()) for w, v in words.items()},
        "lpips": "not measured: LPIPS needs network weights that are not available offline",
    }
    _g2_figure(result, lr, words, Path(args.out) / "g2.png")
    return result


def _g2_figure(result: dict, lr: torch.Tensor, words: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    names = list(result["psnr_y_mean_db"])
    axes[0].bar(names, [result["psnr_y_mean_db"][n] for n in names])
    axes[0].set_ylim(min(result["psnr_y_mean_db"].values()) - 0.5, max(result["psnr_y_mean_db"].values()) + 0.3)
    axes[0].set_ylabel("PSNR (dB), B100 crops")
    axes[0].set_title(f"G2: {result['model']} U-Net, {result['train_steps']} steps")
    row = torch.cat([F.interpolate(lr[:1], scale_factor=4, mode="nearest")[0]] + [words[w][0] for w in words], 2)
    axes[1].imshow(row.permute(1, 2, 0).numpy().clip(0, 1), interpolation="nearest")
    axes[1].set_title("LR | no noise word | 'light' | 'medium' | 'heavy noise'", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes (runs on a CPU in about a minute)")
    parser.add_argument("--only", choices=("g1", "g2"), default=None)
    parser.add_argument("--train-minutes", type=float, default=6.0)
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--workers", type=int, default=14)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "smoke": args.smoke}
    for name, fn in (("g1", g1), ("g2", g2)):
        if args.only in (None, name):
            t0 = time.perf_counter()
            result = fn(args, device) | meta | {"wall_seconds": round(time.perf_counter() - t0, 1)}
            (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
            print(f"wrote {args.out / name}.json", flush=True)


if __name__ == "__main__":
    main()
