"""InvSR: parity with the official code on its fixture, the checkpoint loader and convert, schedules, CLI.

The fixture folder is ../shared/fixtures/invsr, or $DIFFSR_FIXTURE_INVSR; its own cases.json lists the
cases, so a case added there (or another folder of the same layout) needs no change here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fixture_folder
from PIL import Image

pytest.importorskip("diffusers")

from diffsr.diffusion.runtime import NoiseSource  # noqa: E402
from diffsr.models.invsr import NoisePredictorConfig, infer_config, load_noise_predictor  # noqa: E402
from diffsr.models.loading import WeightsError  # noqa: E402
from diffsr.pipelines.invsr import OFFICIAL_TIMESTEPS, PROMPT, load_pipeline, timestep_schedule  # noqa: E402

FIXTURE = fixture_folder("invsr")
FLOAT_TOLERANCE = 1e-4  # the fixture README's tolerances
PNG_TOLERANCE = 1


def _cases() -> list:
    index = FIXTURE / "cases.json"
    if not index.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{index} is absent: the InvSR fixture exists only beside "
                                                                  "the development checkout and in CI"))]
    return [pytest.param(case, id=case["name"]) for case in json.loads(index.read_text())["cases"]]


def _need_fixture() -> Path:
    if not (FIXTURE / "cases.json").is_file():
        pytest.skip(f"{FIXTURE} is absent: the InvSR fixture exists only beside the development checkout and in CI")
    return FIXTURE


def _tiny_config(folder: Path) -> NoisePredictorConfig:
    return NoisePredictorConfig.from_dict(json.loads((folder / "noise_predictor_tiny_params.json").read_text()))


def _read_rgb(path: Path) -> torch.Tensor:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def pipeline():
    folder = _need_fixture()
    return load_pipeline(str(folder / "noise_predictor_tiny.pth"), str(folder / "sd_turbo_tiny"),
                         predictor_config=str(folder / "noise_predictor_tiny_params.json"), device="cpu", dtype="fp32")


@pytest.mark.parametrize("case", _cases())
def test_official_parity(pipeline, case):
    folder = FIXTURE / "expected" / case["name"]
    details = json.loads((folder / "case.json").read_text())
    stored = np.load(folder / "draws.npz")
    noise = NoiseSource(injected=[torch.from_numpy(stored[d["key"]]) for d in details["draws_in_order"]])
    lr = _read_rgb(FIXTURE / case["input"])
    assert list(timestep_schedule(case["num_steps"])) == case["timesteps"]  # the official table picks them
    for call in details["pipeline_calls"]:  # the sigma schedule of every call
        assert pipeline.sigmas(call["timesteps"]).tolist() == pytest.approx(call["scheduler_sigmas"], abs=1e-7)
    out = pipeline.enhance(lr, case["timesteps"], noise, case["chopping_size"], case["chopping_bs"], case["color_fix"] or "none")
    out = out[0].permute(1, 2, 0).numpy()
    assert list(out.shape[:2]) == case["output_hw"]
    assert noise.remaining() == 0  # every recorded draw consumed, in order (shapes are checked per draw)
    diff = np.abs(out[::2, ::2] - np.load(folder / "output_f32_stride2.npy"))
    print(f"{case['name']}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}")
    assert diff.max() <= FLOAT_TOLERANCE
    png = np.asarray(Image.open(folder / "output.png").convert("RGB")).astype(np.int16)
    assert np.abs(np.rint(out * 255).astype(np.int16) - png).max() <= PNG_TOLERANCE


def _trace() -> dict:
    trace_path = FIXTURE / "expected" / "A_s1" / "trace.npz"
    if not trace_path.is_file():
        pytest.skip(f"{trace_path} is absent")
    return np.load(trace_path)


def test_trace_prompt(pipeline):
    trace = _trace()
    ids = pipeline.m.tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == trace["call0__token_ids"].tolist()
    assert np.abs(pipeline.prompt_embeds.numpy() - trace["call0__prompt_embeds"]).max() <= 1e-5


@pytest.mark.slow
def test_trace_predictor(pipeline):
    """The predictor's raw output against the trace (the parity cases cover it end to end; this localises a fault)."""
    trace = _trace()
    lr = _read_rgb(FIXTURE / "inputs" / "A_Canon_10_x1.png")
    with torch.no_grad():
        moments = pipeline.m.predictor.moments(lr, torch.tensor([float(trace["call0__unet_t_step0"][0])]))
    assert np.abs(moments.numpy() - trace["call0__np_moments"]).max() <= 1e-4


def test_schedules():
    assert timestep_schedule(3) == (200, 100, 50) and timestep_schedule(5) == OFFICIAL_TIMESTEPS[5]
    assert timestep_schedule(6) == (250, 208, 166, 125, 83, 41)  # the official demos' linspace beyond 5 steps
    assert timestep_schedule(2, start=150) == (150, 75)
    assert timestep_schedule(1, explicit="100, 200") == (200, 100)
    with pytest.raises(ValueError, match="timesteps"):
        timestep_schedule(1, explicit="0,5")
    with pytest.raises(ValueError, match="start-timestep"):
        timestep_schedule(10, start=5)


def test_checkpoint_variants_and_convert(tmp_path):
    folder = _need_fixture()
    config = _tiny_config(folder)
    original = torch.load(folder / "noise_predictor_tiny.pth", map_location="cpu", weights_only=True)
    reference = load_noise_predictor(str(folder / "noise_predictor_tiny.pth"), config).state_dict()
    for name, content in {"ddp": {"module." + k: v for k, v in original.items()},
                          "compiled": {"state_dict": {"_orig_mod." + k: v for k, v in original.items()}}}.items():
        torch.save(content, tmp_path / f"{name}.pth")
        loaded = load_noise_predictor(str(tmp_path / f"{name}.pth"), config).state_dict()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    # widths and depths come from the tensors (the tiny [2, 1] layers included); groups/heads need the config
    inferred = infer_config(original)
    assert inferred.block_out_channels == (16, 32) and inferred.layers_per_block == (2, 1) and inferred.temb_channels == 32
    from diffsr.cli.main import main

    out = tmp_path / "np.safetensors"
    assert main(["convert", "--method", "invsr", str(folder / "noise_predictor_tiny.pth"), "-o", str(out)]) == 0
    converted = load_noise_predictor(str(out), config).state_dict()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    broken = dict(original)
    broken.pop("encoder.conv_out.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="noise_predictor_sd_turbo_v5.pth.*OAOA/InvSR"):
        load_noise_predictor(str(tmp_path / "broken.pth"), config)
    torch.save({"first_stage_model.x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a invsr checkpoint"):
        load_noise_predictor(str(tmp_path / "other.pth"))


def test_official_config_size():
    """The default config is the released v5 predictor: 33,837,576 parameters (the research note's count)."""
    from diffsr.models.invsr import NoisePredictor

    with torch.device("meta"):
        model = NoisePredictor()
    assert sum(p.numel() for p in model.parameters()) == 33_837_576


def test_cli_and_half_precision(pipeline, tmp_path):
    """`diffsr upscale --method invsr` end to end on a small image (32 px patches), and bf16 stays close to fp32."""
    from tiny_models import gradient_image, save_png

    from diffsr.cli.main import main

    folder = FIXTURE
    source = save_png(tmp_path / "in" / "small.png", gradient_image(24, 40))
    args = ["upscale", "-q", str(source), "-o", str(tmp_path / "out"), "--method", "invsr",
            "--weights", str(folder / "noise_predictor_tiny.pth"), "--base", str(folder / "sd_turbo_tiny"),
            "--predictor-config", str(folder / "noise_predictor_tiny_params.json"), "--device", "cpu", "--dtype", "fp32",
            "--steps", "2", "--chopping-size", "32", "--color-fix", "ycbcr", "--seed", "3"]
    assert main(args) == 0
    out = np.asarray(Image.open(tmp_path / "out" / "small_out.png"))
    assert out.shape == (96, 160, 3) and out.std() > 1
    lr = torch.from_numpy(gradient_image(24, 40).astype(np.float32) / 255).permute(2, 0, 1)[None]
    same = pipeline.enhance(lr, (200, 100), NoiseSource(seed=3), 32, 8, "ycbcr")
    assert np.abs(np.rint(same[0].permute(1, 2, 0).numpy() * 255) - out).max() <= 1  # the CLI is this path
    half = load_pipeline(str(folder / "noise_predictor_tiny.pth"), str(folder / "sd_turbo_tiny"),
                         predictor_config=str(folder / "noise_predictor_tiny_params.json"), device="cpu", dtype="bf16")
    small = lr[..., :16, :16]  # one 16 px patch: bf16 on a CPU without bf16 units is slow
    low, full = half.enhance(small, (200,), NoiseSource(seed=3), 16), pipeline.enhance(small, (200,), NoiseSource(seed=3), 16)
    assert torch.isfinite(low).all() and (low - full).abs().mean() < 0.05 and (low - full).abs().max() > 0


def test_ycbcr_color_fix():
    """InvSR's ycbcr fix: the output's luma is the target's, its chroma the reference's (MATLAB BT.601)."""
    from diffsr.colorfix import _to_ycbcr, color_fix

    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 16, 12, generator=gen) * 0.4 + 0.3
    reference = (target + torch.rand(2, 3, 16, 12, generator=gen) * 0.1 - 0.05).clamp(0, 1)  # colours inside the gamut
    out = color_fix(target, reference, "ycbcr")
    assert 0 < out.min() and out.max() < 1  # nothing clipped, so the decomposition below is exact
    ycc_out, ycc_target, ycc_ref = (_to_ycbcr(x, only_y=False) for x in (out, target, reference))
    assert torch.allclose(ycc_out[:, :1], ycc_target[:, :1], atol=2e-5)
    assert torch.allclose(ycc_out[:, 1:], ycc_ref[:, 1:], atol=2e-5)
    # the official constants: Y of pure white is 235/255, of black 16/255; a grey keeps its chroma at 128/255
    assert _to_ycbcr(torch.ones(1, 3, 1, 1), True).item() == pytest.approx(235 / 255, abs=1e-6)
    assert _to_ycbcr(torch.zeros(1, 3, 1, 1), False).flatten().tolist() == pytest.approx([16 / 255, 128 / 255, 128 / 255], abs=1e-6)
    assert torch.allclose(color_fix(target, target, "ycbcr"), target, atol=1e-4)  # the two conversions invert each other


def test_color_reference_alignment():
    """The official reference squeezes the padded LR into the output (shifted content); "aligned" does not."""
    from diffsr.pipelines.invsr import color_reference

    lr = torch.zeros(1, 3, 8, 12)
    lr[..., 5:, :] = 1.0  # an edge 5/8 of the way down
    padded = torch.nn.functional.pad(lr, (0, 0, 2, 2), mode="reflect")  # as the min-size padding would
    official, aligned = color_reference(padded, lr, (32, 48)), color_reference(padded, lr, (32, 48), "aligned")
    edge = lambda image: int((image[0, 0, :, 24] > 0.5).nonzero()[0])  # noqa: E731
    assert edge(aligned) == 20  # 5/8 of 32 rows
    assert edge(official) == 19  # (2 + 5)/12 of 32 rows = 18.7: shifted by the padding
    assert torch.equal(color_reference(lr, lr, (32, 48)), aligned)  # no padding: both are the same
