"""OSEDiff without the shared fixture: a tiny SD 2 base and a tiny checkpoint in the official pkl layout.

Covers loading the pkl and its `diffsr convert` safetensors, the LoRA scale, errors for wrong files,
tiling, the resize-back fix (#52), the long-thin latent-tiling loop, grey/alpha inputs and the CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffsr.io.image import ImageData
from diffsr.models.loading import WeightsError


def _lora_checkpoint(base_dir: Path, seed: int = 0) -> dict:
    """Official-layout weights for the tiny base: the official target lists, random B (peft leaves B = 0), changed conv_in."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffsr.pipelines.osediff import add_lora, official_checkpoint, unet_lora_targets, vae_lora_targets

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae")
    unet_targets, vae_targets = unet_lora_targets(unet), vae_lora_targets(vae)
    add_lora(unet, unet_targets, 4)
    add_lora(vae, {"default_encoder": vae_targets}, 4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (unet, vae):
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        unet.conv_in.base_layer.weight.add_(torch.randn(unet.conv_in.base_layer.weight.shape, generator=generator) * 0.05)
    return official_checkpoint(unet, vae, unet_targets, vae_targets, 4, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from diffsr.cli.convert import convert_checkpoint
    from diffsr.diffusion.tiny import build_tiny_sd2

    root = tmp_path_factory.mktemp("osediff")
    base = build_tiny_sd2(root / "base", deterministic_posterior=True)
    pkl = root / "osediff.pkl"
    torch.save(_lora_checkpoint(base.diffusers_dir), pkl)
    converted = root / "osediff.safetensors"
    assert convert_checkpoint("osediff", pkl, converted) > 0
    return {"base": base, "pkl": pkl, "safetensors": converted, "root": root}


@pytest.fixture(scope="module")
def pipeline(files):
    from diffsr.pipelines.osediff import load

    return load(str(files["pkl"]), str(files["base"].diffusers_dir), device="cpu", dtype="fp32")


def _image(height: int = 16, width: int = 16, channels: int = 3, seed: int = 0, alpha: bool = False) -> ImageData:
    rng = np.random.default_rng(seed)
    pixels = np.round(rng.uniform(0, 1, (height, width, channels)) * 255).astype(np.float32) / 255
    return ImageData(pixels, rng.uniform(0, 1, (height, width)).astype(np.float32) if alpha else None, 8)


FAST = {"seed": 0, "align_method": "nofix", "process_size": 64}
"""A 16 px LR is not pre-enlarged at process_size 64: outputs stay 64 px, the runs take a fraction of a second."""


def test_official_target_lists_cover_the_unet_and_encoder(files):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffsr.pipelines.osediff import unet_lora_targets, vae_lora_targets

    unet = UNet2DConditionModel.from_pretrained(files["base"].diffusers_dir, subfolder="unet")
    groups = unet_lora_targets(unet)
    assert "conv_in" in groups["default_encoder"] and "conv_out" in groups["default_decoder"]
    assert all(m.startswith("mid_block") for m in groups["default_others"]) and groups["default_others"]
    assert not any("time_emb" in m or "norm" in m for g in groups.values() for m in g)
    vae = AutoencoderKL.from_pretrained(files["base"].diffusers_dir, subfolder="vae")
    targets = vae_lora_targets(vae)
    assert "quant_conv" in targets and "post_quant_conv" not in targets
    assert not any(m.startswith("decoder") for m in targets) and len(targets) > len(set(targets))  # official repeats


def test_pkl_and_converted_safetensors_give_the_same_output(files, pipeline):
    from diffsr.pipelines.osediff import load

    converted = load(str(files["safetensors"]), str(files["base"].diffusers_dir), device="cpu", dtype="fp32")
    image = _image()
    a = pipeline.upscale(image, **FAST).pixels
    b = converted.upscale(image, **FAST).pixels
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    from safetensors import safe_open

    with safe_open(str(files["safetensors"]), "pt") as handle:
        assert handle.metadata()["diffsr_method"] == "osediff"
        assert any(k.startswith("unet.conv_in.base_layer") for k in handle.keys())


def test_lora_scale_is_alpha_over_rank(files, pipeline):
    """A hand-merged base (W + 8/r * B A, conv_in from the pkl) reproduces the peft pipeline; scale 1 would not."""
    from diffsr.diffusion.loading import load_base
    from diffsr.pipelines.osediff import TIMESTEP

    state = torch.load(files["pkl"], weights_only=True)
    base = load_base(files["base"].diffusers_dir, "sd21-base", components=("unet",)).unet
    lq = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    embeds = pipeline.encode_prompt("a photo")
    expected = pipeline.unet(lq, torch.tensor([TIMESTEP]), encoder_hidden_states=embeds).sample

    def merged(scale: float) -> torch.Tensor:
        unet = load_base(files["base"].diffusers_dir, "sd21-base", components=("unet",)).unet
        modules = dict(unet.named_modules())
        lora = state["state_dict_unet"]
        with torch.no_grad():
            unet.conv_in.weight.copy_(lora["conv_in.base_layer.weight"])
            unet.conv_in.bias.copy_(lora["conv_in.base_layer.bias"])
            for key, down in lora.items():
                if ".lora_A." in key:
                    up = lora[key.replace(".lora_A.", ".lora_B.")]
                    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) if down.ndim == 4 else up @ down
                    modules[key.split(".lora_A.")[0]].weight += scale * delta
            return unet(lq, torch.tensor([TIMESTEP]), encoder_hidden_states=embeds).sample

    assert (merged(8 / state["rank_unet"]) - expected).abs().max() < 1e-4
    assert (merged(1.0) - expected).abs().max() > 1e-3
    assert (base(lq, torch.tensor([TIMESTEP]), encoder_hidden_states=embeds).sample - expected).abs().max() > 1e-3


def test_merged_lora_matches_unmerged(files, pipeline):
    from diffsr.pipelines.osediff import load

    merged = load(str(files["pkl"]), str(files["base"].diffusers_dir), merge_lora=True, device="cpu", dtype="fp32")
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in merged.unet.modules())
    image = _image(seed=1)
    a, b = pipeline.upscale(image, **FAST).pixels, merged.upscale(image, **FAST).pixels
    assert np.abs(a - b).max() <= 2 / 255  # 8-bit truncation can flip a level; the float difference is ~1e-6
    assert merged.settings()["merged_lora"] is True


def test_colour_fix_and_determinism(pipeline):
    image = _image(seed=2)
    plain = pipeline.upscale(image, seed=5, align_method="nofix", process_size=64).pixels
    adain = pipeline.upscale(image, seed=5, align_method="adain", process_size=64).pixels
    wavelet = pipeline.upscale(image, seed=5, align_method="wavelet", process_size=64).pixels
    assert not np.array_equal(plain, adain) and not np.array_equal(plain, wavelet)
    for out in (plain, adain, wavelet):  # 8-bit input: the official ToPILImage levels
        assert np.allclose(out * 255, np.round(out * 255), atol=1e-3)
    assert np.array_equal(plain, pipeline.upscale(image, seed=5, align_method="nofix", process_size=64).pixels)


def test_resize_back_fixes_issue_52(pipeline):
    """A 10 x 9 LR is first enlarged to short side 128 / 4 = 32 (35 x 32), x4, rescaled to a multiple of 8:
    the official script saves that 136 x 128 result; with the fix the output is 4 x the input, 40 x 36."""
    from diffsr.pipelines.osediff import preprocess

    image = _image(9, 10)
    pre = preprocess(image.pixels, 4, 128)
    assert pre.pre_resized and pre.pixels.shape == (128, 136, 3)
    official = pipeline.upscale(image, **{**FAST, "process_size": 128}, resize_back=False)
    assert official.pixels.shape == (128, 136, 3)
    fixed = pipeline.upscale(image, **{**FAST, "process_size": 128})
    assert fixed.pixels.shape == (36, 40, 3)
    # an odd side without pre-resize: 4 x 17 = 68 is rescaled to 64 by the official; resized back to 68
    odd = _image(16, 17)
    assert pipeline.upscale(odd, resize_back=False, **FAST).pixels.shape == (64, 64, 3)
    assert pipeline.upscale(odd, **FAST).pixels.shape == (64, 68, 3)


def _official_tile_count(length: int, tile: int, overlap: int, limit: int = 10_000) -> int | None:
    """The official OSEDiff_test.forward grid loop, stopped after `limit` rounds (None: it would never end)."""
    count, cur = 0, 0
    while cur < length:
        cur = max(count * tile - overlap * count, 0) + tile
        count += 1
        if count > limit:
            return None
    return count


def test_long_thin_image_tiles_instead_of_hanging(pipeline):
    """A 6 x 18 LR (latent 3 x 9 > tile 5^2): the official tile shrinks to min(5, 3, 9) = 3 <= overlap 4 and its
    grid loop never ends; here the overlap is halved and the tiles cover the latent."""
    from diffsr.latent_tiling import SCHEMES, tile_grid

    assert _official_tile_count(9, 3, 4) is None and _official_tile_count(24, 8, 4) == 5
    tiles = tile_grid(3, 9, 5, 4, SCHEMES["osediff"])
    assert len(tiles) > 1 and all(t.y1 - t.y0 == 3 and t.x1 - t.x0 == 3 for t in tiles)
    covered = torch.zeros(3, 9)
    for t in tiles:
        covered[t.y0:t.y1, t.x0:t.x1] = 1
    assert covered.all()
    events = []
    out = pipeline.upscale(_image(6, 18), **{**FAST, "process_size": 16}, latent_tile=5, latent_overlap=4, on_progress=events.append)
    assert out.pixels.shape == (24, 72, 3)
    assert [e.total for e in events if e.stage == "tiles"][-1] == len(tiles)


def test_latent_and_vae_tiling(pipeline):
    """The tiled encoder in exact mode stays at the untiled result (its halo covers most of the tiny VAE's field);
    the official hook's statistics do not. 136 px is above the hook's untiled limit of tile + 2 pad = 128."""
    from diffsr.diffusion.runtime import NoiseSource

    lq = torch.from_numpy(_image(34, 34, seed=4).pixels).permute(2, 0, 1)[None].repeat(1, 1, 4, 4) * 2 - 1  # 136 x 136
    embeds = pipeline.encode_prompt("")
    run = lambda **kw: pipeline.restore(lq, embeds, NoiseSource(seed=0), **kw)  # noqa: E731
    untiled = run(vae_tiling=False)
    exact = run(vae_encoder_tile=64, vae_decoder_tile=64, vae_statistics="exact")
    hook = run(vae_encoder_tile=64, vae_decoder_tile=64, vae_statistics="vaehook")
    assert exact.shape == untiled.shape == (1, 3, 136, 136)
    assert (exact - untiled).abs().max() < 1e-2
    assert (hook - untiled).abs().max() > 10 * (exact - untiled).abs().max()


def test_grey_and_alpha_inputs(pipeline):
    grey = pipeline.upscale(_image(16, 16, channels=1, alpha=True), **FAST)
    assert grey.pixels.shape == (64, 64, 1) and grey.alpha.shape == (64, 64)
    assert 0 <= grey.alpha.min() and grey.alpha.max() <= 1


def test_progress_and_settings(pipeline):
    events = []
    pipeline.upscale(_image(), on_progress=events.append, **FAST)
    assert {"vae_encode", "tiles", "steps", "vae_decode"} <= {e.stage for e in events}
    settings = pipeline.settings(prompt="x", seed=None)
    assert settings["method"] == "osediff" and settings["prompt"] == "x" and "seed" not in settings


def test_prompt_building():
    from diffsr.pipelines.osediff import build_prompt

    assert build_prompt("building, sky", "") == "building, sky, ,"
    assert build_prompt("building", "sharp") == "building, sharp,"
    assert build_prompt("", "a photo") == "a photo" and build_prompt() == ""


def test_weight_errors(files, tmp_path):
    from diffsr.pipelines.osediff import load, read_weights

    with pytest.raises(WeightsError, match="not found"):
        read_weights(tmp_path / "osediff.pkl")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="not a readable"):
        read_weights(garbage)
    other = tmp_path / "other.pth"
    torch.save({"params_ema": {"conv.weight": torch.zeros(1)}}, other)
    with pytest.raises(WeightsError, match=r"not an OSEDiff checkpoint.*osediff\.pkl.*github\.com/cswry/OSEDiff"):
        read_weights(other)
    state = torch.load(files["pkl"], weights_only=True)
    damaged = dict(state, unet_lora_others_modules=state["unet_lora_others_modules"][:-1])
    torch.save(damaged, tmp_path / "damaged.pkl")
    with pytest.raises(WeightsError, match="damaged"):
        read_weights(tmp_path / "damaged.pkl")
    no_conv_in = dict(state, state_dict_unet={k: v for k, v in state["state_dict_unet"].items() if "base_layer" not in k})
    torch.save(no_conv_in, tmp_path / "partial.pkl")
    with pytest.raises(WeightsError, match="conv_in"):
        read_weights(tmp_path / "partial.pkl")
    wrong = dict(state, state_dict_unet={**state["state_dict_unet"], "conv_in.base_layer.weight": torch.zeros(7, 4, 3, 3)})
    torch.save(wrong, tmp_path / "wrong.pkl")
    with pytest.raises(WeightsError, match="SD 2.1-base"):
        load(str(tmp_path / "wrong.pkl"), str(files["base"].diffusers_dir), device="cpu", dtype="fp32")
    with pytest.raises(WeightsError, match="base model not found"):
        load(str(files["pkl"]), str(tmp_path / "no-such-base"), device="cpu", dtype="fp32")


class _Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_pickled_code_is_refused(tmp_path):
    from diffsr.pipelines.osediff import read_weights

    path = tmp_path / "evil.pkl"
    torch.save({"state_dict_unet": _Payload()}, path)
    with pytest.raises(WeightsError, match="unpickling"):
        read_weights(path)


def test_single_file_base(files, pipeline):
    """The base as one original-layout file (v2-1_512-ema-pruned.safetensors layout) gives the folder's result."""
    from diffsr.pipelines.osediff import load

    single = load(str(files["pkl"]), str(files["base"].single_file), config_dir=str(files["base"].diffusers_dir), device="cpu",
                  dtype="fp32")
    image = _image(seed=6)
    assert np.abs(single.upscale(image, **FAST).pixels - pipeline.upscale(image, **FAST).pixels).max() <= 1 / 255 + 1e-6


def test_pkl_saved_from_a_gpu_loads_on_the_cpu(files, tmp_path, monkeypatch):
    """The published pkl was saved from CUDA tensors; plain torch.load fails without CUDA, map_location='cpu' works."""
    from diffsr.pipelines.osediff import read_weights

    state = torch.load(files["pkl"], weights_only=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # what a GPU-side save records
        torch.save(state, tmp_path / "cuda.pkl")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "cuda.pkl", weights_only=True)
    weights = read_weights(tmp_path / "cuda.pkl")
    assert all(t.device.type == "cpu" for t in weights.unet.values())
    assert torch.equal(weights.unet["conv_in.base_layer.weight"], state["state_dict_unet"]["conv_in.base_layer.weight"])


def test_cli_upscale_and_convert(files, tmp_path):
    """diffsr convert and diffsr upscale --method osediff with the converted file; the method is listed by diffsr models."""
    from PIL import Image

    from diffsr.cli.main import main
    from tiny_models import save_png

    converted = tmp_path / "w.safetensors"
    assert main(["convert", "--method", "osediff", str(files["pkl"]), "-o", str(converted)]) == 0
    assert main(["convert", "--method", "osediff", str(files["pkl"]), "-o", str(converted)]) == 1  # exists, no --overwrite
    save_png(tmp_path / "in" / "a.png", np.asarray(np.round(_image().pixels * 255), dtype=np.uint8))
    code = main(["upscale", "-q", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--method", "osediff", "--weights", str(converted),
                 "--base", str(files["base"].diffusers_dir), "--process-size", "64", "--tags", "sky", "--seed", "0",
                 "--device", "cpu", "--dtype", "fp32"])
    assert code == 0
    assert Image.open(tmp_path / "out" / "a_out.png").size == (64, 64)
    assert main(["upscale", "-q", str(tmp_path / "in"), "-o", str(tmp_path / "bad"), "--method", "osediff",
                 "--weights", str(tmp_path / "missing.pkl"), "--base", str(files["base"].diffusers_dir)]) != 0
