"""Degradation model: kernels, noise, JPEG, prompts, presets, determinism and shapes."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffsr.degrade import (
    PRESETS,
    DegradationConfig,
    Degrader,
    KernelSettings,
    PromptBins,
    PromptPolicy,
    get_config,
)
from diffsr.degrade.jpeg import LUMA_QUANT, jpeg_compress, quality_tables
from diffsr.degrade.kernels import (
    draw_kernel,
    filter2d,
    gaussian_family_kernel,
    sinc_kernel,
    usm_sharpen,
)
from diffsr.degrade.noise import add_noise
from diffsr.degrade.prompts import Bins, normalize_prompt, phrases


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic test picture: smooth colour gradients, edges and fine texture, uint8 RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y), 0.3 + 0.5 * x * y], axis=2)
    base[(x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.05] *= 0.5
    texture = rng.normal(0, 0.04, (height // 2, width // 2, 3)).repeat(2, 0).repeat(2, 1)[:height, :width]
    return (np.clip(base + texture, 0, 1) * 255).round().astype(np.uint8)


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def pillow_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse) if mse else float("inf")


# ------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc"])
def test_drawn_kernels_sum_to_one_and_have_the_drawn_size(kind):
    settings = KernelSettings(kinds=(kind,), probs=(1.0,), sinc_prob=0.0) if kind != "sinc" else KernelSettings(sinc_prob=1.0)
    rng = random.Random(3)
    for _ in range(20):
        kernel, params = draw_kernel(settings, rng)
        assert kernel.shape == (21, 21)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-9)
        assert params["kernel"] == kind and params["size"] in settings.sizes
        pad = (21 - params["size"]) // 2
        inner = kernel[pad : 21 - pad, pad : 21 - pad]
        assert inner.sum().item() == pytest.approx(1.0, abs=1e-9), "weight outside the drawn size"
        assert torch.allclose(kernel, kernel.flip(0, 1)), "kernels are point-symmetric"
        if kind != "sinc":
            assert settings.sigma[0] <= params["sigma_x"] <= settings.sigma[1]
            assert settings.sigma[0] <= params["sigma_y"] <= settings.sigma[1]
            if kind.endswith("_iso") or kind == "iso":
                assert params["sigma_x"] == params["sigma_y"] and params["rotation"] == 0.0


def test_gaussian_kernel_has_the_drawn_covariance():
    theta, sx, sy = 0.6, 2.0, 1.0
    kernel = gaussian_family_kernel("aniso", 41, sx, sy, theta)
    axis = torch.arange(-20, 21, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    cov = torch.tensor([[(kernel * xx * xx).sum(), (kernel * xx * yy).sum()], [(kernel * xx * yy).sum(), (kernel * yy * yy).sum()]])
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    expected = rot @ torch.diag(torch.tensor([sx**2, sy**2], dtype=torch.float64)) @ rot.T
    assert torch.allclose(cov, expected, atol=1e-3)


def test_lower_sinc_cutoff_removes_more_high_frequencies():
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def high_frequency(omega: float) -> float:
        out = filter2d(noise, sinc_kernel(omega, 21)[None])
        return (out[..., 1:, :] - out[..., :-1, :]).pow(2).mean().item()

    assert high_frequency(math.pi / 5) < high_frequency(math.pi / 2) < high_frequency(math.pi * 0.95)


def test_filter2d_applies_each_samples_own_kernel():
    images = torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    kernels = torch.stack([gaussian_family_kernel("aniso", 21, 0.5 + i, 1.0, 0.3 * i) for i in range(3)])
    out = filter2d(images, kernels)
    for i in range(3):
        padded = F.pad(images[i : i + 1], (10, 10, 10, 10), mode="reflect")
        expected = F.conv2d(padded, kernels[i].float().expand(3, 1, 21, 21), groups=3)
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)


def test_usm_sharpens_edges_and_leaves_flat_areas():
    image = torch.zeros(1, 3, 64, 64)
    image[..., 32:] = 0.8
    blurred = filter2d(image, gaussian_family_kernel("iso", 11, 2.0, 2.0, 0.0)[None])
    sharp = usm_sharpen(blurred)
    edge = lambda t: (t[..., 1:] - t[..., :-1]).abs().max().item()
    assert edge(sharp) > edge(blurred) * 1.2
    assert torch.allclose(sharp[..., :, :8], blurred[..., :, :8], atol=1e-6)


# --------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("grey", [False, True])
def test_gaussian_noise_std_matches_the_drawn_sigma(grey):
    image = torch.full((1, 3, 256, 256), 0.5)
    out = add_noise(image, [{"type": "gaussian", "sigma": 20.0, "grey": grey}], [torch.Generator().manual_seed(0)])
    noise = (out - image)[0] * 255
    assert noise.std().item() == pytest.approx(20.0, rel=0.02)
    correlation = torch.corrcoef(noise.reshape(3, -1))[0, 1].item()
    assert correlation > 0.999 if grey else abs(correlation) < 0.02


def test_poisson_noise_variance_follows_the_scale_and_the_signal():
    ramp = torch.arange(256.0).repeat(3, 256, 1) / 255.0  # all 256 levels, so the level count is 256
    image = ramp[None]
    for scale in (0.5, 1.5):
        out = add_noise(image, [{"type": "poisson", "scale": scale, "grey": False}], [torch.Generator().manual_seed(1)])
        noise = (out - image)[0]
        middle = (image[0] > 0.25) & (image[0] < 0.6)  # away from the clips at 0 and 1
        ratio = (noise[middle] ** 2).mean() / (image[0][middle] / 256).mean()
        assert ratio.item() == pytest.approx(scale**2, rel=0.08)


# ---------------------------------------------------------------------------------------------- JPEG


def test_quality_tables_follow_libjpeg_scaling():
    luma, chroma = quality_tables(torch.tensor([50, 100, 10, 75]))
    assert luma[0].tolist() == list(LUMA_QUANT)
    assert luma[1].max().item() == 1 and chroma[1].max().item() == 1
    assert luma[2].max().item() == 255  # baseline clamp
    assert luma[3, 0].item() == math.floor((16 * 50 + 50) / 100)


@pytest.mark.parametrize("size", [(64, 64), (40, 56)])
@pytest.mark.parametrize("quality", [30, 60, 90])
def test_jpeg_is_close_to_pillow_at_the_same_quality(size, quality):
    image = photo_like(*size, seed=quality)
    ours = (jpeg_compress(to_batch([image]), [quality])[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    reference = pillow_jpeg(image, quality)
    assert psnr(ours, reference) > 40.0
    assert np.mean(ours == reference) > 0.6
    # our error is far smaller than the compression error itself
    assert np.mean((ours.astype(float) - reference) ** 2) < 0.1 * np.mean((reference.astype(float) - image) ** 2)


def test_jpeg_error_tracks_the_quality_of_each_sample():
    image = photo_like(64, 64)
    qualities = [10, 30, 50, 70, 90, 100]
    out = jpeg_compress(to_batch([image] * len(qualities)), qualities)
    errors = [(out[i] - to_batch([image])[0]).pow(2).mean().item() for i in range(len(qualities))]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 5


def test_differentiable_jpeg_passes_gradients_and_matches_forward():
    x = to_batch([photo_like(32, 32)]).requires_grad_(True)
    out = jpeg_compress(x, [50], differentiable=True)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(out.detach(), jpeg_compress(x.detach(), [50]))


# ------------------------------------------------------------------------------------------- prompts


def test_bins_are_half_open_with_the_top_closed():
    bins = PromptBins()
    assert [bins.blur.word(s) for s in (0.2, 0.999, 1.0, 1.999, 2.0, 3.0, 3.5, 0.1)] == [
        "light", "light", "medium", "medium", "heavy", "heavy", "heavy", "light"]  # fmt: skip
    assert [bins.compression.word(q) for q in (30, 51, 52, 73, 74, 95, 100)] == [
        "heavy", "heavy", "medium", "medium", "light", "light", "light"]  # fmt: skip
    assert bins.gaussian_noise.word(10.0) == "medium" and bins.poisson_noise.word(0.99) == "light"
    with pytest.raises(ValueError):
        Bins((1.0, 0.5), ("a",))


def _expected_phrase(step: dict) -> str | None:
    """The research note's table 2.2, written out independently of diffsr.degrade.prompts."""
    def level(value, edges, words):
        for low, high, word in zip(edges, edges[1:], words):
            if low <= value < high:
                return word
        return words[-1] if value >= edges[-1] else words[0]

    lmh = ("light", "medium", "heavy")
    if step["stage"] == "blur":
        return None if step["kernel"] == "sinc" else level(max(step["sigma_x"], step["sigma_y"]), (0.2, 1, 2, 3), lmh) + " blur"
    if step["stage"] == "resize":
        if step["pass"] == "final":
            return "downsample"
        return {"up": "upsample", "down": "downsample"}.get(step["direction"])
    if step["stage"] == "noise":
        if step["type"] == "gaussian":
            return level(step["sigma"], (1, 10, 20, 30), lmh) + " noise"
        return level(step["scale"], (0.05, 1, 2, 3), lmh) + " noise"
    return level(step["quality"], (30, 52, 74, 95), ("heavy", "medium", "light")) + " compression"


@pytest.mark.parametrize("preset", ["promptsr", "realesrgan"])
def test_prompt_words_match_the_bins_of_the_drawn_parameters(preset):
    degrader = Degrader(preset)
    for seed in range(200):
        _, record, _ = degrader.plan(seed, (256, 256))
        expected = [p for p in map(_expected_phrase, record.steps) if p]
        assert record.prompt() == ", ".join(expected)
        final = "downsample" if preset == "promptsr" else "compression"  # Real-ESRGAN's final JPEG may come last
        assert record.prompt().endswith("downsample") or record.prompt().endswith(final)


def test_promptsr_fixed_order_stages_and_skips():
    degrader = Degrader("promptsr")
    canonical = ["blur", "resize", "noise", "jpeg"]
    skipped = 0
    for seed in range(300):
        _, record, _ = degrader.plan(seed, (256, 256))
        stages = [s["stage"] for s in record.steps]
        assert stages[-1] == "resize" and record.steps[-1]["pass"] == "final"
        assert stages[:-1] == [s for s in canonical if s in stages[:-1]]
        skipped += len(set(canonical) - set(stages[:-1]))
    # blur, noise and JPEG each skipped with p 0.1, the first resize kept with p 0.1: 0.4 per sample
    assert 0.25 < skipped / 300 < 0.55


def test_shuffled_order_is_random_but_final_resize_stays_last():
    degrader = Degrader("promptsr_shuffle")
    orders = set()
    for seed in range(200):
        _, record, _ = degrader.plan(seed, (256, 256))
        assert record.steps[-1]["stage"] == "resize" and record.steps[-1]["pass"] == "final"
        orders.add(tuple(s["stage"] for s in record.steps[:-1]))
        words = record.prompt().split(", ")
        assert words == [p for p in map(_expected_phrase, record.steps) if p]  # phrases follow the applied order
    assert len(orders) > 8


def test_short_prompts_name_a_subset():
    _, record, _ = Degrader("promptsr").plan(5, (256, 256))
    noise = [s for s in record.steps if s["stage"] == "noise"]
    short = record.prompt(stages=("noise",))
    assert short == (_expected_phrase(noise[0]) if noise else "")
    assert record.prompt(stages=("noise", "final"), brackets=True).endswith("downsample]")
    with pytest.raises(ValueError):
        record.prompt(stages=("colour",))


def test_normalize_prompt():
    assert normalize_prompt("[Light Noise]") == "light noise"
    assert normalize_prompt(" Heavy Blur ,downsample ") == "heavy blur, downsample"


def test_prompt_policy_rates():
    steps = Degrader("promptsr").plan(1, (256, 256))[1].steps
    full = phrases(steps)
    rng = random.Random(0)
    policy = PromptPolicy(partial_prob=0.2, drop_prob=0.5, empty_prob=0.1)
    draws = [policy.apply(steps, PromptBins(), rng) for _ in range(4000)]
    empty = sum(d == "" for d in draws) / len(draws)
    assert abs(empty - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(draws))
    assert all(d.endswith("downsample") for d in draws if d)
    assert any(0 < len(d.split(", ")) < len(full) for d in draws)


def test_more_levels_are_configurable():
    words = ("slight", "light", "medium", "heavy", "severe")
    bins = PromptBins(gaussian_noise=Bins((1, 6, 12, 18, 24, 30), words))
    step = {"stage": "noise", "pass": 1, "type": "gaussian", "sigma": 25.0, "grey": False}
    assert phrases([step], bins) == ["severe noise"]
    assert PromptBins.from_dict(json.loads(json.dumps(bins.to_dict()))) == bins


# ------------------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_lr_shape_for_every_preset_and_scale(preset, scale):
    hr = to_batch([photo_like(96, 120, seed=s) for s in range(2)])
    result = Degrader(preset, scale)(hr, seed=7)
    assert result.lr.shape == (2, 3, 96 // scale, 120 // scale)
    assert result.lr.min() >= 0 and result.lr.max() <= 1
    assert torch.equal(result.lr, (result.lr * 255).round() / 255)  # 8-bit levels
    assert [r.lr_size for r in result.records] == [(96 // scale, 120 // scale)] * 2
    assert torch.equal(result.hr, hr)


def test_same_seed_same_output_and_records():
    hr = to_batch([photo_like(64, 64, seed=s) for s in range(4)])
    a, b = Degrader("realesrgan")(hr, seed=3), Degrader("realesrgan")(hr, seed=3)
    assert torch.equal(a.lr, b.lr) and [r.to_dict() for r in a.records] == [r.to_dict() for r in b.records]
    c = Degrader("realesrgan")(hr, seed=4)
    assert not torch.equal(a.lr, c.lr)


def test_a_sample_does_not_depend_on_its_batch():
    hr = to_batch([photo_like(64, 64, seed=s) for s in range(4)])
    seeds = [11, 12, 13, 14]
    batch = Degrader("realesrgan")(hr, seeds)
    alone = Degrader("realesrgan")(hr[2:3], seeds[2:3])
    assert batch.records[2].to_dict() == alone.records[0].to_dict()
    assert (batch.lr[2] - alone.lr[0]).abs().max().item() <= 1.5 / 255


def test_drawn_parameters_stay_in_the_configured_ranges():
    config = get_config("stablesr")
    degrader = Degrader(config)
    for seed in range(300):
        _, record, _ = degrader.plan(seed, (512, 512))
        for step in record.steps:
            stage = config.first if step["pass"] == 1 else config.second
            if step["stage"] == "jpeg":
                low, high = config.final.jpeg_quality if step["pass"] == "final" else stage.jpeg_quality
                assert low <= step["quality"] <= high and isinstance(step["quality"], int)
            elif step["stage"] == "noise":
                if step["type"] == "gaussian":
                    assert stage.noise_sigma[0] <= step["sigma"] <= stage.noise_sigma[1]
                else:
                    assert stage.poisson_scale[0] <= step["scale"] <= stage.poisson_scale[1]
            elif step["stage"] == "resize" and step["pass"] != "final":
                assert stage.resize_range[0] <= step["factor"] <= stage.resize_range[1]
            elif step["stage"] == "blur" and step["pass"] != "final" and step["kernel"] != "sinc":
                assert stage.kernel.sigma[0] <= step["sigma_x"] <= stage.kernel.sigma[1]


def test_no_degradation_gives_the_resized_hr():
    config = get_config("promptsr").replace(no_degradation_prob=1.0)
    hr = to_batch([photo_like(64, 64)])
    result = Degrader(config)(hr, seed=0)
    expected = torch.clamp((F.interpolate(hr, size=(16, 16), mode="bicubic") * 255).round(), 0, 255) / 255
    assert torch.equal(result.lr, expected) and result.records[0].clean
    assert result.prompts == ["downsample"]


def test_sharpening_presets_sharpen_only_the_source():
    hr = to_batch([photo_like(64, 64)])
    with_usm = Degrader(get_config("realesrgan"))(hr, seed=2)
    without = Degrader(get_config("realesrgan").replace(sharpen=False))(hr, seed=2)
    assert with_usm.records[0].sharpened and torch.equal(with_usm.hr, hr)
    assert not torch.equal(with_usm.lr, without.lr)


def test_bad_sizes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="multiple of the scale"):
        Degrader("realesrgan", 4)(torch.rand(1, 3, 30, 32), seed=0)
    with pytest.raises(ValueError, match="divide 8-bit images by 255"):
        Degrader("realesrgan")(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), seed=0)
    with pytest.raises(ValueError, match="RGB batch"):
        Degrader("realesrgan")(torch.rand(3, 32, 32), seed=0)


def test_config_round_trip_and_json_files(tmp_path):
    for config in PRESETS.values():
        assert DegradationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(PRESETS["invsr"].replace(name="mine").to_dict()))
    assert get_config(str(path)).name == "mine"
    data = PRESETS["invsr"].to_dict()
    data["first"]["jpeg_qualty"] = [1, 2]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="jpeg_qualty"):
        get_config(str(path))
    with pytest.raises(ValueError, match="unknown degradation preset"):
        get_config("bsrgan")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu_parameters_and_is_deterministic():
    hr = to_batch([photo_like(64, 64, seed=s) for s in range(4)])
    gpu = Degrader("realesrgan", device="cuda")
    a, b = gpu(hr, seed=1), gpu(hr, seed=1)
    cpu = Degrader("realesrgan", device="cpu")(hr, seed=1)
    assert torch.equal(a.lr, b.lr) and a.lr.device.type == "cuda"
    assert [r.to_dict() for r in a.records] == [r.to_dict() for r in cpu.records]


@pytest.mark.parametrize("preset", ["realesrgan", "osediff", "stablesr", "invsr"])
def test_second_order_chains_have_one_jpeg_per_pass(preset):
    degrader = Degrader(preset)
    final_first = 0
    for seed in range(100):
        _, record, _ = degrader.plan(seed, (256, 256))
        jpeg_passes = [s["pass"] for s in record.steps if s["stage"] == "jpeg"]
        if record.clean:
            continue
        assert jpeg_passes == [1, "final"]
        stages = [(s["stage"], s["pass"]) for s in record.steps]
        assert stages[0] in (("blur", 1), ("resize", 1), ("noise", 1))
        final = [i for i, s in enumerate(record.steps) if s["pass"] == "final"]
        assert final == list(range(final[0], len(record.steps)))  # the final group closes the chain
        final_first += record.steps[final[0]]["stage"] == "jpeg"
    assert 25 < final_first < 75  # JPEG before [resize + sinc] half the time


def test_resizes_compose_as_real_esrgan():
    """Pass 1 resizes by scale_factor (as Real-ESRGAN), the final resize goes to exactly HR/scale."""
    from diffsr.degrade import FinalSettings, StageSettings

    only_resize = DegradationConfig(
        name="resize-only",
        first=StageSettings(blur_prob=0.0, resize_probs=(0.0, 1.0, 0.0), resize_modes=("bilinear",), noise_prob=0.0, jpeg_prob=0.0),
        second=None,
        final=FinalSettings(resize_modes=("area",), sinc_prob=0.0, jpeg_prob=0.0),
    ).validate()
    hr = to_batch([photo_like(64, 96)])
    result = Degrader(only_resize, 4)(hr, seed=[21])
    steps = result.records[0].steps
    assert [(s["stage"], s["pass"]) for s in steps] == [("resize", 1), ("resize", "final")]
    factor = steps[0]["factor"]
    middle = F.interpolate(hr, scale_factor=factor, mode="bilinear")
    assert list(middle.shape[-2:]) == steps[0]["size"]
    expected = torch.clamp((F.interpolate(middle, size=(16, 24), mode="area") * 255).round(), 0, 255) / 255
    assert torch.equal(result.lr, expected)
    assert result.prompts == ["downsample, downsample"]
