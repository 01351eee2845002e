"""PromptSR evidence on a CPU (research note promptsr.md, 7.2): E1 describer, E2 text path, E3 diffusion, E4 describer prompts, bench.

    PYTHONPATH=. python benchmarks/promptsr_evidence.py e1 --describer diffsr/models/describer.safetensors
    PYTHONPATH=. python benchmarks/promptsr_evidence.py e2 --budget-minutes 6
    PYTHONPATH=. python benchmarks/promptsr_evidence.py e3 --budget-minutes 25
    PYTHONPATH=. python benchmarks/promptsr_evidence.py bench

Needs ../shared/data (BSDS500 train for training, B100 = BSDS500 val for testing, never trained on).
Every experiment writes benchmarks/results/promptsr/<name>.json (config, seed, wall time, steps,
metrics) and, where it has one, a figure <name>.png. The budgets are wall-clock: on a shared 2-core
CPU the step counts are small, and the JSON says how many were reached.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "promptsr"

from diffsr.data.folders import find_images, load_rgb, to_tensor  # noqa: E402
from diffsr.degrade.config import PRESETS  # noqa: E402
from diffsr.degrade.pipeline import Degrader, sample_seed  # noqa: E402


def _write(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}")
    return path


def load_hr(folder: Path, limit: int | None = None) -> list[torch.Tensor]:
    """HR images as 3 x H x W tensors cropped to multiples of 4 (BSDS: 480 x 320 or 320 x 480)."""
    out = []
    for path in find_images(folder)[:limit]:
        t = to_tensor(load_rgb(path))
        out.append(t[:, : t.shape[1] // 4 * 4, : t.shape[2] // 4 * 4])
    return out


def degrade_all(images: list[torch.Tensor], config, seeds: list[int]) -> tuple[list[torch.Tensor], list]:
    """Degrade each image with its own seed, batched by shape; returns LR tensors and records in order."""
    degrader = Degrader(config, 4, device="cpu")
    lrs: list = [None] * len(images)
    records: list = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), 16):
            group = indices[start : start + 16]
            batch = degrader(torch.stack([images[i] for i in group]), [seeds[i] for i in group])
            for j, i in enumerate(group):
                lrs[i], records[i] = batch.lr[j], batch.records[j]
    return lrs, records


def bootstrap_ci(diff: torch.Tensor, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95 % paired-bootstrap interval of the mean of per-sample differences."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(diff), (resamples, len(diff)), generator=gen)
    means = diff[index].mean(1)
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def _paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean per-sample difference (dB), its 95 % paired-bootstrap interval and the fraction of wins."""
    diff = a - b
    return {"mean_db": float(diff.mean()), "ci95_db": bootstrap_ci(diff), "wins": float((diff > 0).float().mean())}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) on RGB in [0, 1], 8-bit rounded like a saved image."""
    a = (a.clamp(0, 1) * 255).round() / 255
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    return F.conv2d(x, kernel, groups=3).pow(2).flatten(1).mean(1)


# ------------------------------------------------------------------------------------------------ E1


def _edge_distance(steps: list[dict], bins) -> dict[str, float]:
    """Per applied stage: distance of its parameter to the nearest inner bin edge, in widths of the bin it falls in."""
    from diffsr.degrade.prompts import binned_parameter

    out = {}
    for step in steps:
        binned = None if step.get("pass") == "final" else binned_parameter(step, bins)
        if binned is not None:
            stage, value, stage_bins = binned
            i = stage_bins.index(value)
            out[stage] = min(abs(value - e) for e in stage_bins.edges[1:-1]) / (stage_bins.edges[i + 1] - stage_bins.edges[i])
    return out


def _ece(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of the top class (equal-width confidence bins)."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    index = (confidence * bins).long().clamp(max=bins - 1)
    return float(sum((index == b).float().sum() / len(labels) * (correct[index == b].mean() - confidence[index == b].mean()).abs()
                     for b in range(bins) if (index == b).any()))


def _stage_report(stage: str, y: torch.Tensor, logits: torch.Tensor, majority: int, threshold: float) -> dict:
    from diffsr.models.describer import CLASSES

    p = logits.argmax(1)
    probs = logits.softmax(1)
    k = len(CLASSES[stage])
    confusion = torch.zeros(k, k, dtype=torch.long)
    for a, b in zip(y.tolist(), p.tolist()):
        confusion[a, b] += 1
    f1 = []
    for c in range(k):
        tp = confusion[c, c].item()
        prec, rec = tp / max(1, confusion[:, c].sum().item()), tp / max(1, confusion[c].sum().item())
        f1.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    stated = probs.max(1).values >= threshold
    return {
        "classes": list(CLASSES[stage]),
        "accuracy": float((p == y).float().mean()),
        "macro_f1": sum(f1) / k,
        "ordinal_error_rate": float(((p - y).abs() >= 2).float().mean()) if stage != "resize" else None,
        "expected_calibration_error": _ece(probs, y),
        f"stated_at_threshold_{threshold:g}": {"fraction": float(stated.float().mean()),
                                               "accuracy": float((p == y)[stated].float().mean()) if stated.any() else None},
        "confusion_true_rows_pred_cols": confusion.tolist(),
        "chance_majority_class": CLASSES[stage][majority],
        "chance_accuracy": float((y == majority).float().mean()),
        "uniform_guess_accuracy": 1 / k,
    }


def e1(args: argparse.Namespace) -> None:
    """The describer on held-out B100 (natural PromptSR distribution, fixed order) vs chance and classical baselines.

    The natural set is scored twice: with the describer's own (balanced) class priors, and with the logits
    moved to the natural chain's priors (`prior_shift`, Bayes' rule; no fitted parameter)."""
    from diffsr.degrade.prompts import PromptBins
    from diffsr.models.describer import BASELINES, CLASSES, STAGES, DegradationDescriber, ThresholdClassifier, labels_from_steps, prior_shift
    from diffsr.train.describer import degradation

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    describer = DegradationDescriber.load(args.describer)
    describer.logit_shift = {}  # score the network's own posteriors; the priors are applied explicitly below
    bins = PromptBins()
    b100 = load_hr(SHARED / "bench" / "b100" / "HR", args.test_images)
    tests = [img for img in b100 for _ in range(args.seeds)]
    results: dict = {"describer": str(args.describer), "describer_metadata": describer.metadata, "seeds_per_image": args.seeds,
                     "test_images": len(tests), "threshold": args.threshold, "sets": {}}
    calib_hr = load_hr(SHARED / "train" / "bsds500", args.calibration)
    trained_on = degradation(True)
    for mode in ("natural", "balanced"):
        config = PRESETS["promptsr"] if mode == "natural" else trained_on
        seeds = [sample_seed(1234, mode, i) for i in range(len(tests))]
        lrs, records = degrade_all(tests, config, seeds)
        labels = {s: torch.tensor([labels_from_steps(r.steps)[s] for r in records]) for s in STAGES}
        raw = {s: [] for s in STAGES}
        for lr in lrs:
            out = describer.logits(lr[None])
            for s in STAGES:
                raw[s].append(out[s][0])
        raw = {s: torch.stack(v) for s, v in raw.items()}
        shift = prior_shift(trained_on, config)
        variants = {"describer_priors": raw, "target_priors": {s: raw[s] + torch.tensor(shift[s]) for s in STAGES}}
        # baselines calibrated on BSDS500 train images degraded the same way
        c_lrs, c_records = degrade_all(calib_hr, config, [sample_seed(99, mode, i) for i in range(len(calib_hr))])
        c_labels = {s: torch.tensor([labels_from_steps(r.steps)[s] for r in c_records]) for s in STAGES}
        distances = [_edge_distance(r.steps, bins) for r in records]
        factors = torch.tensor([next((st.get("factor", 1.0) for st in r.steps if st["stage"] == "resize" and st.get("pass") == 1), 1.0)
                                for r in records])
        # What any describer can see of the noise: the same seeds replayed on a flat grey image give the LR's
        # noise level after the resizes; the best thresholds on it, fitted on the test set itself, bound how
        # well the noise bin (drawn before the resizes) can be told from the noise level
        flats, _ = degrade_all([torch.full_like(img, 0.5) for img in tests], config, seeds)
        visible = torch.stack([flat.std() * 255 for flat in flats])
        oracle = ThresholdClassifier.fit(visible, labels["noise"])
        entry_set: dict = {"noise_level_oracle": {
            "accuracy": float((oracle.predict(visible) == labels["noise"]).float().mean()),
            "what": "best thresholds on the LR's own noise level (std of the same degradation of a flat grey image), fitted on the test set"}}
        print(f"{mode:9s} noise-level oracle accuracy {entry_set['noise_level_oracle']['accuracy']:.3f}")
        for variant, logits in variants.items():
            if mode == "balanced" and variant == "target_priors":
                continue  # the balanced set has the describer's own priors: the shift is zero
            report = {}
            for s in STAGES:
                y = labels[s]
                majority = int(torch.bincount(c_labels[s], minlength=len(CLASSES[s])).argmax())
                entry = _stage_report(s, y, logits[s], majority, args.threshold)
                if s != "resize":  # accuracy against the distance to the nearest bin edge, on images where the stage ran
                    hit = (logits[s].argmax(1) == y)
                    dist = torch.tensor([d.get(s, -1.0) for d in distances])
                    buckets = {f"[{lo}, {hi})": (dist >= lo) & (dist < hi) for lo, hi in ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 9.0))}
                    entry["accuracy_by_edge_distance"] = {
                        name: {"count": int(mask.sum()), "accuracy": float(hit[mask].float().mean()) if mask.any() else None}
                        for name, mask in buckets.items()}
                if s in BASELINES and variant == "describer_priors":
                    fn = BASELINES[s]
                    feature = torch.stack([fn(lr[None])[0] for lr in lrs])
                    c_feature = torch.stack([fn(lr[None])[0] for lr in c_lrs])
                    classifier = ThresholdClassifier.fit(c_feature, c_labels[s])
                    entry["baseline"] = {"name": fn.__name__, "accuracy": float((classifier.predict(feature) == y).float().mean()),
                                         "thresholds": classifier.thresholds, "class_order": classifier.order}
                report[s] = entry
                base = entry.get("baseline", {}).get("accuracy")
                print(f"{mode:9s} {variant:16s} {s:12s} acc {entry['accuracy']:.3f}  chance {entry['chance_accuracy']:.3f}  "
                      f"ece {entry['expected_calibration_error']:.3f}  baseline {base if base is None else round(base, 3)}")
            predicted = {s: logits[s].argmax(1) for s in STAGES}
            noise_hit = predicted["noise"] == labels["noise"]
            interactions = {
                "noise_accuracy_when_blur_heavy": float(noise_hit[labels["blur"] == 3].float().mean()),
                "compression_accuracy_when_noise_heavy": float((predicted["compression"] == labels["compression"])[labels["noise"] == 3].float().mean()),
                "blur_accuracy_when_resize_up": float((predicted["blur"] == labels["blur"])[labels["resize"] == 2].float().mean()),
                # the noise seen in the LR is the drawn sigma scaled by the final resize (1 / (4 x first factor))
                "noise_accuracy_by_first_resize_factor": {
                    f"[{lo}, {hi})": float(noise_hit[(factors >= lo) & (factors < hi)].float().mean())
                    for lo, hi in ((0.15, 0.35), (0.35, 0.7), (0.7, 1.0001), (1.0001, 1.6)) if ((factors >= lo) & (factors < hi)).any()},
            }
            exact = torch.stack([predicted[s] == labels[s] for s in STAGES]).all(0)
            entry_set[variant] = {"per_stage": report, "exact_match": float(exact.float().mean()), "interactions": interactions}
        results["sets"][mode] = entry_set
    results["seconds"] = round(time.perf_counter() - started, 1)
    _write(args.name, results)
    _e1_figure(results, RESULTS / f"{args.name}.png")


def _e1_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(results["sets"]["natural"]["describer_priors"]["per_stage"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, mode in zip(axes, ("natural", "balanced")):
        rep = results["sets"][mode]["describer_priors"]["per_stage"]
        if mode == "natural":
            ax.scatter([i - 0.27 for i in range(len(stages))], [results["sets"][mode]["target_priors"]["per_stage"][s]["accuracy"]
                                                               for s in stages], marker="_", s=300, color="k", label="with natural priors", zorder=3)
        x = range(len(stages))
        ax.bar([i - 0.27 for i in x], [rep[s]["accuracy"] for s in stages], 0.27, label="describer")
        ax.bar(list(x), [rep[s].get("baseline", {}).get("accuracy", 0) for s in stages], 0.27, label="classical baseline")
        ax.bar([i + 0.27 for i in x], [rep[s]["chance_accuracy"] for s in stages], 0.27, label="majority class")
        oracle = results["sets"][mode].get("noise_level_oracle", {}).get("accuracy")
        if oracle is not None:
            ax.scatter([stages.index("noise")], [oracle], marker="*", s=120, color="C3", label="noise-level oracle", zorder=3)
        ax.set_xticks(list(x), stages)
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out B100, {mode} sampling")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------- E2 + E4


def _noise_config(low: float, high: float):
    """PromptSR's chain reduced to Gaussian noise in one bin + the final x4 downsample (no blur, resize or JPEG)."""
    base = PRESETS["promptsr"]
    first = replace(base.first, blur_prob=0.0, resize_probs=(0.0, 0.0, 1.0), noise_prob=1.0, gaussian_prob=1.0,
                    noise_sigma=(low, high), jpeg_prob=0.0)
    return replace(base, name=f"promptsr_noise_{low:g}_{high:g}", first=first)


LEVEL_RANGES = {"light": (1.0, 9.99), "heavy": (20.0, 30.0)}


def _e2_data(images: list[torch.Tensor], seed: int, copies: int):
    """Each image degraded `copies` times per noise level: LR images, HR, level and the pipeline's prompt."""
    items = []
    for level, (low, high) in LEVEL_RANGES.items():
        imgs = [img for img in images for _ in range(copies)]
        lrs, records = degrade_all(imgs, _noise_config(low, high), [sample_seed(seed, level, i) for i in range(len(imgs))])
        for img, lr, record in zip(imgs, lrs, records):
            items.append({"hr": img, "lr": lr, "level": level, "prompt": record.prompt()})
    return items


def _crops(items, count: int, gen: torch.Generator, lr_size: int = 8, fixed: bool = False):
    hr, lr, index = [], [], []
    for k in range(count):
        i = k % len(items) if fixed else int(torch.randint(len(items), (1,), generator=gen))
        item = items[i]
        h, w = item["lr"].shape[-2:]
        if fixed:
            y, x = (h - lr_size) // 2 + (k // len(items)) * lr_size, (w - lr_size) // 2
        else:
            y, x = int(torch.randint(h - lr_size + 1, (1,), generator=gen)), int(torch.randint(w - lr_size + 1, (1,), generator=gen))
        lr.append(item["lr"][:, y : y + lr_size, x : x + lr_size])
        hr.append(item["hr"][:, 4 * y : 4 * (y + lr_size), 4 * x : 4 * (x + lr_size)])
        index.append(i)
    return torch.stack(hr), torch.stack(lr), index


def _restorer_forward(unet, lr: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """E2's one-step restorer: noisy-HR channels zero, fixed t = 0, output = bicubic LR + the U-Net's residual.

    The residual form is ours: from scratch, a CPU budget of ~100 steps is spent learning the identity
    otherwise, and what the prompt should change (how much to smooth) is a residual anyway."""
    from diffsr.models.promptsr import predict_noise, upsample_lr

    up = upsample_lr(lr)
    return up + predict_noise(unet, torch.zeros_like(up), up, 0, states)


def e2(args: argparse.Namespace) -> None:
    """Does the text path carry information? Prompted vs no-prompt one-step restorers on two noise bins (+ E4)."""
    from diffsr.models.describer import DegradationDescriber
    from diffsr.models.promptsr import EmbeddingCache, build_unet, minilm_encoder

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_hr = load_hr(SHARED / "train" / "bsds500", args.train_images)
    test_hr = load_hr(SHARED / "bench" / "b100" / "HR", args.test_images)
    train_items = _e2_data(train_hr, 0, 1)
    test_items = _e2_data(test_hr, 777, args.test_copies)
    data_seconds = time.perf_counter() - started
    encoder = minilm_encoder()
    cache = EmbeddingCache(encoder)
    prompts = sorted({it["prompt"] for it in train_items + test_items} | {""})
    cache(prompts, "cpu")
    swap = {"light": "heavy", "heavy": "light"}
    prompt_of = {it["level"]: it["prompt"] for it in test_items}

    def train_run(mode: str, steps: int | None) -> tuple[torch.nn.Module, int, float]:
        torch.manual_seed(args.seed)
        unet = build_unet("cpu-tiny", encoder.hidden_size, seed=args.seed)
        optimizer = torch.optim.Adam(unet.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(args.seed)  # the same crops in both runs
        drops = torch.Generator().manual_seed(args.seed + 1)
        t0, step = time.perf_counter(), 0
        while (steps is None and time.perf_counter() - t0 < args.budget_minutes * 60) or (steps is not None and step < steps):
            hr, lr, index = _crops(train_items, args.batch, gen)
            if mode == "prompted":
                texts = ["" if float(torch.rand(1, generator=drops)) < 0.1 else train_items[i]["prompt"] for i in index]
            else:
                texts = [""] * len(index)
            out = _restorer_forward(unet, lr, cache(texts, "cpu"))
            loss = F.l1_loss(out, hr * 2 - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                print(f"{mode} step {step} loss {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return unet.eval(), step, time.perf_counter() - t0

    prompted, steps, prompted_seconds = train_run("prompted", None)
    plain, _, plain_seconds = train_run("no-prompt", steps)
    if args.save_models:
        torch.save({"prompted": prompted.state_dict(), "no_prompt": plain.state_dict(), "steps": steps}, args.save_models)

    gen = torch.Generator().manual_seed(1)
    hr, lr, index = _crops(test_items, len(test_items) * args.test_crops, gen, fixed=True)
    levels = [test_items[i]["level"] for i in index]

    @torch.no_grad()
    def run(model, texts: list[str]) -> torch.Tensor:
        outs = []
        for start in range(0, len(texts), 64):
            sl = slice(start, start + 64)
            outs.append((_restorer_forward(model, lr[sl], cache(texts[sl], "cpu")) + 1) / 2)
        return torch.cat(outs).clamp(0, 1)

    correct = run(prompted, [prompt_of[lv] for lv in levels])
    swapped = run(prompted, [prompt_of[swap[lv]] for lv in levels])
    empty = run(prompted, [""] * len(levels))
    noprompt = run(plain, [""] * len(levels))
    out_heavy = run(prompted, [prompt_of["heavy"]] * len(levels))
    out_light = run(prompted, [prompt_of["light"]] * len(levels))
    p = {name: psnr(x, hr) for name, x in
         {"correct": correct, "swapped": swapped, "empty": empty, "no_prompt_model": noprompt}.items()}

    def compare(a: str, b: str) -> dict:
        return _paired(p[a], p[b])

    hf_h, hf_l = laplacian_energy(out_heavy), laplacian_energy(out_light)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"} | {"model": "cpu-tiny (1.09 M)", "task": "one-step restorer (t = 0, noisy-HR channels zero, output bicubic + U-Net residual, L1 to HR)",
                                "levels": LEVEL_RANGES, "hr_crop": 32, "prompted_run_empty_rate": 0.1,
                                "train_images": len(train_hr), "test": f"B100, {len(test_items)} degraded images, {len(levels)} crops"},
        "steps": steps, "seconds": {"data": round(data_seconds, 1), "prompted": round(prompted_seconds, 1),
                                    "no_prompt": round(plain_seconds, 1)},
        "psnr_mean_db": {k: float(v.mean()) for k, v in p.items()},
        "correct_vs_no_prompt_model": compare("correct", "no_prompt_model"),
        "correct_vs_swapped": compare("correct", "swapped"),
        "correct_vs_empty": compare("correct", "empty"),
        "by_level_psnr": {lv: {k: float(v[torch.tensor([x == lv for x in levels])].mean()) for k, v in p.items()} for lv in LEVEL_RANGES},
        "sensitivity": {
            "mean_abs_heavy_minus_light": float((out_heavy - out_light).abs().mean()),
            "mean_abs_correct_minus_empty": float((correct - empty).abs().mean()),
            "hf_energy_heavy_lower_fraction": float((hf_h < hf_l).float().mean()),
            "hf_energy_mean": {"heavy_prompt": float(hf_h.mean()), "light_prompt": float(hf_l.mean())},
        },
    }
    # E4: the describer's prompts, from the whole degraded LR image (degradations are global)
    try:
        describer = DegradationDescriber.load(args.describer)
        described = [d.prompt for d in describer.describe_many([it["lr"] for it in test_items])]
        desc_texts = [described[i] for i in index]
        with_desc = run(prompted, desc_texts)
        p_desc = psnr(with_desc, hr)
        gain_gt, gain_desc = float((p["correct"] - p["no_prompt_model"]).mean()), float((p_desc - p["no_prompt_model"]).mean())
        gain_gt_e, gain_desc_e = float((p["correct"] - p["empty"]).mean()), float((p_desc - p["empty"]).mean())
        noise_word = [("heavy noise" in t, "light noise" in t, "medium noise" in t) for t in described]
        result["e4_describer"] = {
            "psnr_mean_db": float(p_desc.mean()),
            "recovered_fraction_vs_no_prompt_model": gain_desc / gain_gt if abs(gain_gt) > 1e-6 else None,
            "recovered_fraction_vs_empty_prompt": gain_desc_e / gain_gt_e if abs(gain_gt_e) > 1e-6 else None,
            "describer_vs_correct": {"mean_db": float((p_desc - p["correct"]).mean()), "ci95_db": bootstrap_ci(p_desc - p["correct"])},
            "noise_word_of_heavy_images": _count([w for w, it in zip(noise_word, test_items) if it["level"] == "heavy"]),
            "noise_word_of_light_images": _count([w for w, it in zip(noise_word, test_items) if it["level"] == "light"]),
            "example_prompts": sorted(set(described))[:12],
        }
    except Exception as exc:  # the describer is optional for E2
        result["e4_describer"] = {"skipped": str(exc)}
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    _write(args.name, result)
    _e2_figure(result, hr, lr, out_light, out_heavy, levels, RESULTS / f"{args.name}.png")


def _count(flags: list[tuple[bool, bool, bool]]) -> dict:
    return {"heavy": sum(f[0] for f in flags), "light": sum(f[1] for f in flags), "medium": sum(f[2] for f in flags),
            "none": sum(not any(f) for f in flags)}


def _e2_figure(result: dict, hr, lr, out_light, out_heavy, levels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.6]})
    names = list(result["psnr_mean_db"])
    axes[0].bar(names, [result["psnr_mean_db"][n] for n in names], color=["C0", "C3", "C7", "C2"])
    axes[0].set_ylim(min(result["psnr_mean_db"].values()) - 0.5, max(result["psnr_mean_db"].values()) + 0.3)
    axes[0].set_ylabel("PSNR (dB), B100 crops")
    axes[0].tick_params(axis="x", labelrotation=20, labelsize=8)
    axes[0].set_title("E2: prompts carry information")
    heavy = [i for i, level in enumerate(levels) if level == "heavy"][:3]
    tiles = []
    for i in heavy:
        up = F.interpolate(lr[i : i + 1], scale_factor=4, mode="nearest")[0]
        tiles.append(torch.cat([up, out_light[i], out_heavy[i], hr[i]], 2))
    grid = torch.cat(tiles, 1).permute(1, 2, 0).numpy()
    axes[1].imshow(grid.clip(0, 1), interpolation="nearest")
    axes[1].set_title("heavy-noise LR | 'light noise' | 'heavy noise' | HR", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------- E3 + E4


BLUR_RANGES = {"light": (0.2, 0.99), "heavy": (2.0, 3.0)}
SWAP = {"light": "heavy", "heavy": "light"}


def _e3_config(blur: str, noise: str):
    """PromptSR's chain reduced to blur and Gaussian noise, each in one of two well-separated bins, + the x4 downsample."""
    base = PRESETS["promptsr"]
    kernel = replace(base.first.kernel, sigma=BLUR_RANGES[blur])
    first = replace(base.first, blur_prob=1.0, kernel=kernel, resize_probs=(0.0, 0.0, 1.0), noise_prob=1.0, gaussian_prob=1.0,
                    noise_sigma=LEVEL_RANGES[noise], jpeg_prob=0.0)
    return replace(base, name=f"promptsr_e3_{blur}_blur_{noise}_noise", first=first)


def _e3_prompt(blur: str | None, noise: str | None) -> str:
    return ", ".join([f"{blur} blur"] * bool(blur) + [f"{noise} noise"] * bool(noise) + ["downsample"])


def _e3_data(images: list[torch.Tensor], seed: int) -> list[dict]:
    """Each image degraded once per (blur, noise) level pair; the record's prompt is checked against the levels."""
    items = []
    for blur in BLUR_RANGES:
        for noise in LEVEL_RANGES:
            lrs, records = degrade_all(images, _e3_config(blur, noise), [sample_seed(seed, blur, noise, i) for i in range(len(images))])
            for img, lr, record in zip(images, lrs, records):
                prompt = record.prompt()
                assert prompt == _e3_prompt(blur, noise), (prompt, blur, noise)
                items.append({"hr": img, "lr": lr, "blur": blur, "noise": noise, "prompt": prompt})
    return items


def _e3_test_crops(test_items: list[dict], lr_size: int):
    """One fixed centre crop per degraded test image: HR, LR and the item of each crop."""
    hr, lr, index = _crops(test_items, len(test_items), torch.Generator().manual_seed(1), lr_size, fixed=True)
    return hr, lr, [test_items[i] for i in index]


def _e3_sampler(pipe, lr: torch.Tensor, args: argparse.Namespace):
    """DDIM outputs for one prompt per crop, for each of `args.seeds` seeds (seed-major order)."""
    def sample(texts: list[str], guidance: float) -> torch.Tensor:
        outs = []
        for seed in range(args.seeds):
            for start in range(0, len(texts), 64):
                sl = slice(start, start + 64)
                outs.append(pipe(lr[sl], texts[sl], steps=args.steps, guidance_scale=guidance, seed=seed * 1000 + start, tile=0))
        return torch.cat(outs)
    return sample


def _e4_on_diffusion(describer_path: Path, test_items, items, sample, p_correct: torch.Tensor, p_empty: torch.Tensor, hr_all) -> dict:
    """E4: the describer reads each whole degraded LR image; its prompts restore the crops."""
    from diffsr.models.describer import DegradationDescriber

    try:
        path = describer_path if describer_path.is_file() else None  # loaded only now: a describer may finish training meanwhile
        describer = DegradationDescriber.load(path)
    except Exception as exc:  # the describer is optional for E3
        return {"skipped": str(exc)}
    described = {id(it): d.prompt for it, d in zip(test_items, describer.describe_many([it["lr"] for it in test_items]))}
    texts = [described[id(it)] for it in items]
    p_desc = psnr(sample(texts, 1.0), hr_all)
    gain_gt = float((p_correct - p_empty).mean())
    return {
        "describer": str(path or "shipped"),
        "psnr_mean_db": float(p_desc.mean()),
        "describer_vs_empty": _paired(p_desc, p_empty),
        "describer_vs_correct": _paired(p_desc, p_correct),
        "recovered_fraction_vs_empty_prompt": float((p_desc - p_empty).mean()) / gain_gt if abs(gain_gt) > 1e-6 else None,
        "prompt_counts": {t: texts.count(t) for t in sorted(set(texts))},
    }


def e4(args: argparse.Namespace) -> None:
    """E4 again on a saved E3 model (e.g. with a newer describer): correct, empty and describer prompts only."""
    from diffsr.models.promptsr import PromptSRConfig, build_unet, minilm_encoder
    from diffsr.pipelines.promptsr import PromptSRPipeline

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    test_items = _e3_data(load_hr(SHARED / "bench" / "b100" / "HR", args.test_images), 777)
    encoder = minilm_encoder()
    saved = torch.load(args.model, map_location="cpu", weights_only=True)
    unet = build_unet("cpu-tiny", encoder.hidden_size, seed=0)
    unet.load_state_dict(saved["unet"])
    pipe = PromptSRPipeline(unet.eval(), encoder, {}, PromptSRConfig(text_encoder=encoder.identity()))
    hr, lr, items = _e3_test_crops(test_items, args.hr_crop // 4)
    sample = _e3_sampler(pipe, lr, args)
    hr_all = hr.repeat(args.seeds, 1, 1, 1)
    p_correct = psnr(sample([it["prompt"] for it in items], 1.0), hr_all)
    p_empty = psnr(sample([""] * len(items), 1.0), hr_all)
    result = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "e3_model_steps": saved["steps"],
              "psnr_mean_db": {"correct": float(p_correct.mean()), "empty": float(p_empty.mean())},
              "e4_describer": _e4_on_diffusion(args.describer, test_items, items, sample, p_correct, p_empty, hr_all),
              "seconds": round(time.perf_counter() - started, 1)}
    _write(args.name, result)


def e3(args: argparse.Namespace) -> None:
    """The diffusion model proper: does it use the prompt? correct / empty / swapped / partial prompts, CFG (+ E4)."""
    from diffsr.models.promptsr import TRAIN_TIMESTEPS, EmbeddingCache, PromptSRConfig, build_unet, minilm_encoder, predict_noise, train_scheduler, upsample_lr
    from diffsr.pipelines.promptsr import PromptSRPipeline

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    train_items = _e3_data(load_hr(SHARED / "train" / "bsds500", args.train_images), 0)
    test_items = _e3_data(load_hr(SHARED / "bench" / "b100" / "HR", args.test_images), 777)
    data_seconds = time.perf_counter() - started
    encoder = minilm_encoder()
    cache = EmbeddingCache(encoder)
    scheduler = train_scheduler()
    unet = build_unet("cpu-tiny", encoder.hidden_size, seed=args.seed)
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    lr_size = args.hr_crop // 4
    t0, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < args.budget_minutes * 60:
        hr, lr, index = _crops(train_items, args.batch, gen, lr_size)
        texts = ["" if float(torch.rand(1, generator=gen)) < 0.1 else train_items[i]["prompt"] for i in index]
        x0 = hr * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)
        loss = F.l1_loss(predict_noise(unet, scheduler.add_noise(x0, noise, t), upsample_lr(lr), t, cache(texts, "cpu")), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"e3 step {step} loss {sum(losses[-50:]) / 50:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t0
    if args.save_model:
        torch.save({"unet": unet.state_dict(), "steps": step}, args.save_model)

    unet.eval()
    pipe = PromptSRPipeline(unet, encoder, {}, PromptSRConfig(text_encoder=encoder.identity()))
    hr, lr, items = _e3_test_crops(test_items, lr_size)
    prompts = {
        "correct": [it["prompt"] for it in items],
        "empty": [""] * len(items),
        "swapped": [_e3_prompt(SWAP[it["blur"]], SWAP[it["noise"]]) for it in items],
        "partial": [_e3_prompt(it["blur"], None) if k % 2 else _e3_prompt(None, it["noise"]) for k, it in enumerate(items)],
        "noise_swapped": [_e3_prompt(it["blur"], SWAP[it["noise"]]) for it in items],
        "heavy_noise": [_e3_prompt(it["blur"], "heavy") for it in items],
        "light_noise": [_e3_prompt(it["blur"], "light") for it in items],
    }
    runs = [(name, 1.0) for name in ("correct", "empty", "swapped", "partial", "noise_swapped")]
    runs += [("heavy_noise", args.guidance), ("light_noise", args.guidance)]
    outputs: dict[str, torch.Tensor] = {}
    t1 = time.perf_counter()
    sample = _e3_sampler(pipe, lr, args)

    for name, guidance in runs:
        key = name if guidance == 1.0 else f"{name}@{guidance:g}"
        outputs[key] = sample(prompts[name], guidance)
        print(f"sampled {key} ({time.perf_counter() - t1:.0f} s)", flush=True)
    sample_seconds = time.perf_counter() - t1
    # at guidance 1 one of the two noise words is each crop's correct prompt: reuse that run instead of sampling it again
    heavy = torch.tensor([it["noise"] == "heavy" for it in items]).repeat(args.seeds).view(-1, 1, 1, 1)
    outputs["heavy_noise"] = torch.where(heavy, outputs["correct"], outputs["noise_swapped"])
    outputs["light_noise"] = torch.where(heavy, outputs["noise_swapped"], outputs["correct"])
    hr_all = hr.repeat(args.seeds, 1, 1, 1)
    p = {k: psnr(outputs[k], hr_all) for k in ("correct", "empty", "swapped", "partial")}

    def spread(g: str) -> dict:
        heavy, light = outputs["heavy_noise" + g], outputs["light_noise" + g]
        hf_h, hf_l = laplacian_energy(heavy), laplacian_energy(light)
        return {"mean_abs_heavy_minus_light": float((heavy - light).abs().mean()),
                "hf_energy_heavy_lower_fraction": float((hf_h < hf_l).float().mean()),
                "hf_energy_mean": {"heavy_prompt": float(hf_h.mean()), "light_prompt": float(hf_l.mean())}}

    n = len(items)
    seed_to_seed = float((outputs["correct"][:n] - outputs["correct"][n:]).abs().mean()) if args.seeds > 1 else None
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"} | {
            "model": "cpu-tiny (1.09 M)", "task": "PromptSR proper: epsilon prediction, L1, 2000-step linear schedule, 10 % empty prompts, DDIM sampling",
            "blur_levels": BLUR_RANGES, "noise_levels": LEVEL_RANGES, "train_degraded_images": len(train_items),
            "test": f"B100, {len(test_items)} degraded images, {n} crops x {args.seeds} seeds"},
        "steps": step, "final_loss_mean_last_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "seconds": {"data": round(data_seconds, 1), "train": round(train_seconds, 1), "sample": round(sample_seconds, 1)},
        "psnr_mean_db": {k: float(v.mean()) for k, v in p.items()},
        "correct_vs_empty": _paired(p["correct"], p["empty"]),
        "empty_vs_swapped": _paired(p["empty"], p["swapped"]),
        "correct_vs_swapped": _paired(p["correct"], p["swapped"]),
        "partial_vs_empty": _paired(p["partial"], p["empty"]),
        "correct_vs_partial": _paired(p["correct"], p["partial"]),
        "noise_word": {"guidance_1": spread(""), f"guidance_{args.guidance:g}": spread(f"@{args.guidance:g}"),
                       "seed_to_seed_mean_abs": seed_to_seed},
    }
    result["e4_describer"] = _e4_on_diffusion(args.describer, test_items, items, sample, p["correct"], p["empty"], hr_all)
    result["seconds"]["total"] = round(time.perf_counter() - started, 1)
    _write(args.name, result)
    _e3_figure(result, hr, lr, outputs, args.guidance, items, RESULTS / f"{args.name}.png")


def _e3_figure(result: dict, hr, lr, outputs, guidance: float, items, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 2]})
    names = list(result["psnr_mean_db"])
    if "psnr_mean_db" in result.get("e4_describer", {}):
        names.append("describer")
    values = [result["psnr_mean_db"].get(n, result.get("e4_describer", {}).get("psnr_mean_db")) for n in names]
    axes[0].bar(names, values, color=["C0", "C7", "C3", "C1", "C2"][: len(names)])
    axes[0].set_ylim(min(values) - 0.5, max(values) + 0.3)
    axes[0].set_ylabel("PSNR (dB), B100 crops")
    axes[0].set_title("E3: diffusion model, DDIM")
    heavy = [i for i, it in enumerate(items) if it["noise"] == "heavy"][:3]
    g = f"@{guidance:g}"
    tiles = [torch.cat([F.interpolate(lr[i : i + 1], scale_factor=4, mode="nearest")[0], outputs["light_noise"][i],
                        outputs["heavy_noise"][i], outputs["light_noise" + g][i], outputs["heavy_noise" + g][i], hr[i]], 2) for i in heavy]
    axes[1].imshow(torch.cat(tiles, 1).permute(1, 2, 0).numpy().clip(0, 1), interpolation="nearest")
    axes[1].set_title(f"heavy-noise LR | 'light' | 'heavy' noise (w 1) | 'light' | 'heavy' (w {guidance:g}) | HR", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------- bench


def bench(args: argparse.Namespace) -> None:
    """Seconds and peak memory of the default 103 M config (random weights) per 128 -> 512 image, and tiled vs untiled."""
    from diffsr.models.promptsr import PhraseTableEncoder, PromptSRConfig, build_unet
    from diffsr.pipelines.promptsr import PromptSRPipeline

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    unet = build_unet("default", 384, seed=0)
    encoder = PhraseTableEncoder(384)  # same width as MiniLM; the encoder's cost is cached away after the first call
    pipe = PromptSRPipeline(unet, encoder, {}, PromptSRConfig(text_encoder=encoder.identity()))
    rows = []

    def measure(lr_size: int, steps: int, tile: int) -> dict:
        lr = torch.rand(1, 3, lr_size, lr_size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        pipe(lr, "heavy noise, downsample", steps=steps, seed=0, tile=tile)
        seconds = time.perf_counter() - t0
        row = {"lr": lr_size, "output": 4 * lr_size, "steps": steps, "tile": tile, "seconds": round(seconds, 2),
               "seconds_per_step": round(seconds / steps, 3),
               "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1)}
        if device.type == "cuda":
            row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(row, flush=True)
        return row

    for steps in args.steps:
        if steps > 0:  # 0: skip the 128 -> 512 rows (peak RSS growth is per process; measure large runs alone)
            rows.append(measure(128, steps, 0))
    for tile in args.tiles if args.large else ():
        rows.append(measure(args.large_lr, args.large_steps, tile))
    _write(args.name, {"device": str(device), "threads": args.threads, "model": "default (102.8 M), random weights, fp32",
                       "note": args.note,
                       "rows": rows})


def real(args: argparse.Namespace) -> None:
    """The describer on real LR photos (no labels): how often each phrase is stated, per set (note 4.3)."""
    from diffsr.models.describer import CLASSES, STAGES, DegradationDescriber

    torch.set_num_threads(args.threads)
    describer = DegradationDescriber.load(args.describer)
    result: dict = {"describer": str(args.describer), "stages_stated": list(describer.stages), "threshold": describer.threshold, "sets": {}}
    for name, folder in (("drealsr_x4_LR", SHARED / "bench" / "drealsr_x4" / "LR"), ("realset80", SHARED / "bench" / "realset80")):
        paths = find_images(folder)
        predictions = [describer.describe(to_tensor(load_rgb(path))[None])[0] for path in paths]
        prompts: dict[str, int] = {}
        for p in predictions:
            prompts[p.prompt] = prompts.get(p.prompt, 0) + 1
        top = {s: {c: sum(max(p.probabilities[s], key=p.probabilities[s].get) == c for p in predictions) for c in CLASSES[s]}
               for s in STAGES}
        result["sets"][name] = {"images": len(paths), "prompts": dict(sorted(prompts.items(), key=lambda kv: -kv[1])),
                                "top_class_counts": top,
                                "mean_probabilities": {s: {c: sum(p.probabilities[s][c] for p in predictions) / len(paths)
                                                           for c in CLASSES[s]} for s in STAGES}}
        print(name, len(paths), "images; most frequent prompts:", list(result["sets"][name]["prompts"].items())[:5])
    _write(args.name, result)


def ship(args: argparse.Namespace) -> None:
    """Copy a trained describer into the package with its held-out E1 figures, only if it clearly beats chance.

    With `--priors natural` (default) the shipped logits carry the shift to the PromptSR chain's class priors
    (`prior_shift`), and the stages it states are judged on those predictions."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from diffsr.models.describer import prior_shift
    from diffsr.train.describer import degradation

    e1_result = json.loads((RESULTS / f"{args.e1}.json").read_text())
    variant = "target_priors" if args.priors == "natural" else "describer_priors"
    natural = e1_result["sets"]["natural"][variant]["per_stage"]
    count = e1_result["test_images"]
    margins = {s: natural[s]["accuracy"] - natural[s]["chance_accuracy"] for s in natural}
    # a stage is stated only if its accuracy beats the majority class in a one-sided binomial test at 95 %
    stated = [s for s, r in natural.items()
              if r["accuracy"] - 1.645 * math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / count) > r["chance_accuracy"]]
    print("accuracy minus majority-class chance on held-out B100:", {s: round(m, 3) for s, m in margins.items()})
    print("stages that beat chance (one-sided 95 %):", stated)
    if margins["noise"] < 0.2 or "noise" not in stated:
        print("not shipped: the noise head does not beat chance by 20 points")
        return
    with safe_open(str(args.describer), "pt") as handle:
        metadata = dict(handle.metadata())
    summary = {s: {k: natural[s][k] for k in ("accuracy", "chance_accuracy", "macro_f1", "expected_calibration_error")} | {
        "baseline_accuracy": e1_result["sets"]["natural"]["describer_priors"]["per_stage"][s].get("baseline", {}).get("accuracy")}
        for s in natural}
    metadata["held_out"] = json.dumps(summary)
    metadata["stages"] = json.dumps(stated)
    if args.priors == "natural":
        metadata["logit_shift"] = json.dumps(prior_shift(degradation(True), PRESETS["promptsr"]))
    metadata["held_out_set"] = json.dumps(f"B100, {e1_result['test_images']} LR images, natural promptsr preset, fixed order, "
                                          f"{args.priors} priors; benchmarks/results/promptsr/{args.e1}.json")
    target = REPO / "diffsr" / "models" / "describer.safetensors"
    save_file(load_file(str(args.describer)), str(target), metadata=metadata)
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB)")


def _e3_test_options(parser: argparse.ArgumentParser) -> None:
    """The test-set and sampling options E3 and E4 share (E4 must be given the E3 run's values)."""
    parser.add_argument("--test-images", type=int, default=32, help="B100 images; each is degraded at all 4 level pairs")
    parser.add_argument("--hr-crop", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps at test time")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--describer", type=Path, default=REPO / "diffsr" / "models" / "describer.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    p1 = sub.add_parser("e1")
    p1.add_argument("--describer", type=Path, default=REPO / "diffsr" / "models" / "describer.safetensors")
    p1.add_argument("--seeds", type=int, default=5, help="degradations per B100 image")
    p1.add_argument("--test-images", type=int, default=None, help="B100 images (default: all 100)")
    p1.add_argument("--calibration", type=int, default=300, help="BSDS500 train images to calibrate the baselines on")
    p1.add_argument("--threshold", type=float, default=0.5, help="confidence below which a phrase is left out")
    p1.add_argument("--threads", type=int, default=1)
    p1.add_argument("--name", default="e1_describer")
    p1.set_defaults(func=e1)
    p2 = sub.add_parser("e2")
    p2.add_argument("--budget-minutes", type=float, default=6.0, help="wall clock of the prompted run (the no-prompt run gets as many steps)")
    p2.add_argument("--train-images", type=int, default=400)
    p2.add_argument("--test-images", type=int, default=None, help="B100 images to test on (default: all 100)")
    p2.add_argument("--test-copies", type=int, default=1)
    p2.add_argument("--test-crops", type=int, default=2)
    p2.add_argument("--batch", type=int, default=32)
    p2.add_argument("--lr", type=float, default=1e-3)
    p2.add_argument("--seed", type=int, default=0)
    p2.add_argument("--threads", type=int, default=1)
    p2.add_argument("--describer", type=Path, default=REPO / "diffsr" / "models" / "describer.safetensors")
    p2.add_argument("--save-models", type=Path, default=None, help="also torch.save both trained U-Nets here")
    p2.add_argument("--name", default="e2_text_path")
    p2.set_defaults(func=e2)
    p5 = sub.add_parser("e3")
    _e3_test_options(p5)
    p5.add_argument("--budget-minutes", type=float, default=25.0, help="wall clock of training")
    p5.add_argument("--train-images", type=int, default=300)
    p5.add_argument("--batch", type=int, default=16)
    p5.add_argument("--lr", type=float, default=1e-3)
    p5.add_argument("--guidance", type=float, default=2.0)
    p5.add_argument("--seed", type=int, default=0)
    p5.add_argument("--save-model", type=Path, default=None)
    p5.add_argument("--name", default="e3_diffusion")
    p5.set_defaults(func=e3)
    p7 = sub.add_parser("e4")
    _e3_test_options(p7)
    p7.add_argument("--model", type=Path, required=True, help="an E3 model saved with e3 --save-model (give its test options)")
    p7.add_argument("--name", default="e4_diffusion")
    p7.set_defaults(func=e4)
    p3 = sub.add_parser("bench")
    p3.add_argument("--device", default="cpu")
    p3.add_argument("--steps", type=int, nargs="+", default=[50, 20])
    p3.add_argument("--large", action="store_true", help="also 512 -> 2048, tiled and untiled")
    p3.add_argument("--large-steps", type=int, default=1)
    p3.add_argument("--large-lr", type=int, default=512, help="LR side of the large run (512 -> 2048 output)")
    p3.add_argument("--tiles", type=int, nargs="+", default=[256, 0], help="tile sizes of the large run (0 = untiled), "
                    "smallest peak first: peak RSS growth is per process")
    p3.add_argument("--threads", type=int, default=2)
    p3.add_argument("--note", default="", help="conditions of the run (machine load), stored with the figures")
    p3.add_argument("--name", default="bench")
    p3.set_defaults(func=bench)
    p6 = sub.add_parser("real")
    p6.add_argument("--describer", type=Path, default=REPO / "diffsr" / "models" / "describer.safetensors")
    p6.add_argument("--threads", type=int, default=1)
    p6.add_argument("--name", default="real_describer")
    p6.set_defaults(func=real)
    p4 = sub.add_parser("ship")
    p4.add_argument("--describer", type=Path, required=True)
    p4.add_argument("--e1", default="e1_describer", help="name of the E1 result to read")
    p4.add_argument("--priors", choices=("natural", "describer"), default="natural",
                    help="natural: ship the logit shift to the PromptSR chain's class priors")
    p4.set_defaults(func=ship)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
