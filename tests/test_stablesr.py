"""StableSR without the shared fixture: schedules, architecture facts, hooks, loading paths, options, CLI.

Tiny random checkpoints in the official layouts (Lightning .ckpt with a pickled callback, the webui
extract, the CFW autoencoder) are written by tests/stablesr_fixture.py; parity with the official code
is tests/test_stablesr_parity.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stablesr_fixture import write_tiny_stablesr
from tiny_models import gradient_image, save_png

from diffsr.diffusion.runtime import NoiseSource
from diffsr.io.image import ImageData
from diffsr.models.loading import WeightsError
from diffsr.pipelines.stablesr import (
    DDIMSchedule,
    _base_alphas_cumprod,
    convert,
    load,
    respaced_schedule,
    space_timesteps,
)

SMALL = dict(steps=2, input_size=32, latent_tile=4, latent_overlap=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_stablesr(tmp_path_factory.mktemp("stablesr"))


@pytest.fixture(scope="module")
def pipeline(tiny):
    return load(weights=str(tiny.ckpt), cfw_weights=str(tiny.cfw), base=str(tiny.base_dir), device="cpu")


@pytest.fixture(scope="module")
def lr() -> np.ndarray:
    return gradient_image(16, 20, seed=3).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def reference(pipeline, lr) -> np.ndarray:
    """Tile mode: 64 x 80 px (padded to 64 x 96) in 2 x 2 pixel patches of 48 px (starts 0, 16 and 0, 48), each on 2 x 2 latent tiles."""
    return pipeline.upscale(ImageData(lr), seed=0, pixel_tile=48, pixel_stride=48, **SMALL).pixels


# ---------------------------------------------------------------------------------------- schedules


def test_space_timesteps_as_the_scripts():
    assert sorted(space_timesteps(1000, [4])) == [0, 333, 666, 999]
    two_hundred = sorted(space_timesteps(1000, [200]))
    assert len(two_hundred) == 200 and two_hundred[:3] == [0, 5, 10] and two_hundred[-2:] == [994, 999]
    twenty = sorted(space_timesteps(1000, [20]))
    assert twenty[:3] == [0, 53, 105] and twenty[-2:] == [946, 999]
    assert 499 in space_timesteps(1000, [21]) and 500 not in space_timesteps(1000, [21])  # linspace would round to 500
    assert space_timesteps(1000, "ddim10") == set(range(0, 1000, 100))
    with pytest.raises(ValueError):
        space_timesteps(10, [11])


def test_respaced_schedule_is_the_original_process():
    acp = _base_alphas_cumprod()
    schedule = respaced_schedule(20)
    kept = np.asarray(schedule.timesteps)
    # the respaced cumulative product equals the original one at the kept timesteps (float32 rounding)
    assert np.allclose(schedule.arrays["alphas_cumprod"], acp[kept], rtol=2e-6)
    assert schedule.arrays["posterior_variance"][0] == 0 and schedule.arrays["posterior_log_variance_clipped"][0] == np.float32(np.log(1e-20))
    assert abs(float(schedule.sqrt_alphas_cumprod_1000[999]) - 0.068264917) < 1e-8


def test_v_prediction_recovers_x0():
    schedule = respaced_schedule(4)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a = float(schedule.arrays["alphas_cumprod"][2])
    x = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    assert torch.allclose(schedule.predict_x0(x, v, 2, "v_prediction"), x0, atol=1e-5)
    assert torch.allclose(schedule.predict_x0(x, eps, 2, "epsilon"), x0, atol=1e-4)


def test_ddim_schedule_keeps_the_official_mismatch():
    acp = torch.tensor(_base_alphas_cumprod(), dtype=torch.float32).numpy()
    ddim = DDIMSchedule.build(20)
    assert ddim.timesteps[1] == 53 and ddim.alphas[1] == acp[50]  # told t=53, stepped with acp[50]
    assert ddim.alphas_prev[0] == acp[0]  # the last step ends at acp[0], not 1
    x, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    deterministic = ddim.step(x, out, 5, torch.randn(1, 4, 4, 4), "epsilon", eta=0.0)
    assert torch.allclose(deterministic, ddim.step(x, out, 5, torch.zeros(1, 4, 4, 4), "epsilon", eta=0.0))


# ---------------------------------------------------------------------------------------- architecture


def test_full_size_architecture_matches_the_official_configs():
    """Parameter counts and SFT placement of the real 512 model (built on the meta device: no memory)."""
    from diffusers import UNet2DConditionModel

    from diffsr.diffusion.bases import BASES
    from diffsr.models.stablesr import CFWFusion, EncoderLayout, SFTLayer, TimeAwareEncoder, parameter_count, unet_resnet_names

    with torch.device("meta"):
        encoder = TimeAwareEncoder(EncoderLayout.official())
        unet = UNet2DConditionModel.from_config({k: v for k, v in BASES["sd21-base"].unet.items() if not k.startswith("_")})
        channels = {name: r.conv2.out_channels for name, r in unet_resnet_names(unet).items()}
        sft = sum(parameter_count(SFTLayer(c, 256)) for c in channels.values())
        cfw = parameter_count(CFWFusion(512)), parameter_count(CFWFusion(256))
    assert parameter_count(encoder) == 52_494_080
    keys = set(encoder.state_dict())
    assert {"fea_tran.3.skip_connection.weight", "input_blocks.7.0.skip_connection.weight", "input_blocks.9.0.op.weight",
            "input_blocks.8.1.qkv.weight", "middle_block.1.proj_out.weight", "time_embed.2.weight"} <= keys
    assert "input_blocks.10.1.qkv.weight" not in keys  # no attention at the deepest level
    assert len(channels) == 22 and sft == 53_020_160
    assert channels["input_blocks.1.0"] == 320 and channels["input_blocks.5.0"] == 640 and channels["middle_block.2"] == 1280
    assert channels["output_blocks.5.0"] == 1280 and channels["output_blocks.8.0"] == 640 and channels["output_blocks.11.0"] == 320
    assert cfw == (33_897_728, 10_496_000)


def test_sft_hook_is_the_official_resblock(pipeline):
    """A hooked diffusers ResnetBlock2D computes skip(x) + SPADE(residual branch), as ResBlockDual does."""
    import torch.nn.functional as F

    unet, adapter = pipeline.models.unet, pipeline.models.adapter
    resnet = unet.down_blocks[1].resnets[0]
    layer = adapter.sft["input_blocks-3-0"]
    x, temb = torch.randn(1, resnet.in_channels, 4, 4), torch.randn(1, resnet.time_emb_proj.in_features)
    features = {"4": torch.randn(1, 32, 4, 4), "8": torch.randn(1, 32, 8, 8)}
    with torch.no_grad(), adapter.conditioned(features):
        hooked = resnet(x, temb)
        h = resnet.conv1(F.silu(resnet.norm1(x))) + resnet.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = F.conv2d(F.silu(resnet.norm2(h)), resnet.conv2.weight, resnet.conv2.bias, padding=1)  # unhooked conv2
        expected = resnet.conv_shortcut(x) + layer(h, features)
    assert torch.allclose(hooked, expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="outside"):
        resnet(x, temb)


# ---------------------------------------------------------------------------------------- inference


def test_tile_mode_geometry_seed_and_cfw(pipeline, lr, reference):
    assert reference.shape == (64, 80, 3) and np.isfinite(reference).all() and 0 <= reference.min() and reference.max() <= 1
    again = pipeline.upscale(ImageData(lr), seed=0, pixel_tile=48, pixel_stride=48, **SMALL).pixels
    assert np.array_equal(again, reference)
    other_seed = pipeline.upscale(ImageData(lr), seed=1, pixel_tile=48, pixel_stride=48, **SMALL).pixels
    assert np.abs(other_seed - reference).max() > 1e-3
    no_cfw = pipeline.upscale(ImageData(lr), seed=0, pixel_tile=48, pixel_stride=48, dec_w=0.0, **SMALL).pixels
    assert np.abs(no_cfw - reference).max() > 1e-3


def test_pixel_patches_are_reseeded(pipeline, lr):
    """Every pixel patch starts from the same noise, as the tile script's seed_everything per patch."""
    seen: list[torch.Tensor] = []
    original = NoiseSource.randn

    def spy(self, shape, device="cpu", dtype=torch.float32, role=""):
        out = original(self, shape, device, dtype, role)
        if role == "vae_posterior":
            seen.append(out.clone())
        return out

    NoiseSource.randn = spy
    try:
        pipeline.upscale(ImageData(lr), seed=5, pixel_tile=48, pixel_stride=48, **dict(SMALL, steps=1))
    finally:
        NoiseSource.randn = original
    assert len(seen) == 4 and all(torch.equal(seen[0], s) for s in seen[1:])


def test_center_crop_mode_and_colour_fix(pipeline, lr):
    out = pipeline.upscale(ImageData(gradient_image(40, 72, seed=1).astype(np.float32) / 255), mode="center-crop",
                           seed=0, color_fix="adain", **SMALL).pixels
    assert out.shape == (32, 32, 3)
    fixed = pipeline.center_crop_sample(gradient_image(40, 72, seed=1).astype(np.float32) / 255, 32, NoiseSource(seed=0), steps=2)
    adain = pipeline.finish(fixed, 0.5, "adain")
    # AdaIN gives the output the reference's per-channel mean (before clamping)
    assert torch.allclose(adain.mean(dim=(2, 3)), fixed.reference.mean(dim=(2, 3)), atol=1e-4)
    plain = pipeline.finish(fixed, 0.5, "none")
    assert not torch.allclose(plain.mean(dim=(2, 3)), fixed.reference.mean(dim=(2, 3)), atol=1e-2)


def test_padding_is_cropped_before_the_final_resize(pipeline):
    """An LR enlarged past --upscale (to reach input_size) and padded to 32: no padding is left (official bug fixed)."""
    lr = gradient_image(12, 20, seed=2).astype(np.float32) / 255
    out = pipeline.upscale(ImageData(lr), seed=0, **dict(SMALL, input_size=64)).pixels
    scale = max(64 / 12, 4.0)
    assert out.shape[:2] == (int(int(12 * scale) * 4 / scale), int(int(20 * scale) * 4 / scale)) == (48, 79)


def test_whole_canvas_with_tiled_vae_equals_untiled(pipeline, lr):
    """pixel_tile 0: one latent canvas; with CFW off the shared tiled VAE bounds memory (halos cover the field here: exact)."""
    options = dict(SMALL, pixel_tile=0, dec_w=0.0, seed=0)
    plain = pipeline.upscale(ImageData(lr), vae_tiling=False, **options).pixels
    tiled = pipeline.upscale(ImageData(lr), vae_tiling=True, vae_encoder_tile=64, vae_decoder_tile=8, **options).pixels
    assert plain.shape == (64, 80, 3) and np.abs(tiled - plain).max() < 1e-4
    with pytest.raises(ValueError, match="multiple of 8"):
        pipeline.upscale(ImageData(lr), pixel_tile=44, pixel_stride=16, **SMALL)
    with pytest.raises(ValueError, match="multiple of 32"):
        pipeline.upscale(ImageData(lr), mode="center-crop", **dict(SMALL, input_size=100))


def test_ddim_guidance_grey_and_alpha(pipeline):
    grey = gradient_image(16, 16, channels=1, seed=4).astype(np.float32) / 255
    alpha = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    out = pipeline.upscale(ImageData(grey, alpha=alpha), seed=0, sampler="ddim", ddim_eta=1.0, guidance=3.0, **SMALL)
    assert out.pixels.shape == (64, 64, 1) and out.alpha.shape == (64, 64) and np.isfinite(out.pixels).all()
    ddpm = pipeline.upscale(ImageData(grey), seed=0, **SMALL).pixels
    assert np.abs(ddpm - out.pixels).max() > 1e-3


# ---------------------------------------------------------------------------------------- loading


def test_webui_extract_on_a_base_equals_the_full_checkpoint(tiny, pipeline, reference, lr):
    webui = load(weights=str(tiny.webui), cfw_weights=str(tiny.cfw), base=str(tiny.base_dir), device="cpu")
    out = webui.upscale(ImageData(lr), seed=0, pixel_tile=48, pixel_stride=48, **SMALL).pixels
    assert np.abs(out - reference).max() <= 1e-5
    with pytest.raises(WeightsError, match="only StableSR's own weights.*--base"):
        load(weights=str(tiny.webui), device="cpu")


def test_convert_round_trip(tiny, reference, lr, tmp_path):
    from diffsr.cli.convert import convert_checkpoint

    from safetensors.torch import load_file

    from diffsr.pipelines.stablesr import read_stablesr_checkpoint

    count = convert_checkpoint("stablesr", tiny.ckpt, tmp_path / "stablesr.safetensors")
    written, original = load_file(str(tmp_path / "stablesr.safetensors")), read_stablesr_checkpoint(tiny.ckpt)
    assert count == len(written) and set(original) - set(written) == {"betas", "cond_stage_model.model.logit_scale"}
    assert all(torch.equal(written[k], original[k]) for k in written)
    convert_checkpoint("stablesr", tiny.cfw, tmp_path / "cfw.safetensors")
    converted = load(weights=str(tmp_path / "stablesr.safetensors"), cfw_weights=str(tmp_path / "cfw.safetensors"),
                     base=str(tiny.base_dir), device="cpu")
    out = converted.upscale(ImageData(lr), seed=0, pixel_tile=48, pixel_stride=48, **SMALL).pixels
    assert np.abs(out - reference).max() <= 1e-5  # same values; memory layouts differ, hence float rounding (~1e-6)


def test_wrong_files_say_what_is_expected(tiny, tmp_path):
    with pytest.raises(WeightsError, match="needs --weights.*stablesr_000117.ckpt"):
        load(device="cpu")
    with pytest.raises(WeightsError, match="no time-aware encoder"):
        load(weights=str(tiny.cfw), base=str(tiny.base_dir), device="cpu")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="garbage.ckpt.*huggingface.co/Iceclear/StableSR"):
        load(weights=str(garbage), device="cpu")
    with pytest.raises(WeightsError, match="neither a StableSR nor a CFW"):
        convert(tiny.base_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_lightning_reader_refuses_other_pickled_code(tmp_path):
    from diffsr.models.loading import load_lightning_checkpoint

    torch.save({"state_dict": {"w": torch.ones(1)}, "trap": NotLightning()}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="test_stablesr.NotLightning.*refuses"):
        load_lightning_checkpoint(tmp_path / "evil.ckpt")


class NotLightning:
    pass


def test_offload_gives_the_same_result(tiny, lr, reference):
    offloaded = load(weights=str(tiny.ckpt), cfw_weights=str(tiny.cfw), base=str(tiny.base_dir), device="cpu", offload=True)
    out = offloaded.upscale(ImageData(lr), seed=0, pixel_tile=48, pixel_stride=48, **SMALL).pixels
    assert np.abs(out - reference).max() <= 1e-6


def test_variants_and_options(tiny, lr):
    v = load(weights=str(tiny.ckpt), base=str(tiny.base_dir), variant="768v", device="cpu")
    assert v.models.prediction == "v_prediction" and v.models.input_size == 768 and v.models.cfw is None
    out = v.upscale(ImageData(lr), seed=0, **SMALL).pixels
    assert out.shape == (64, 80, 3) and np.isfinite(out).all()
    from diffsr.options import OptionError
    from diffsr.registry import get_method

    method = get_method("stablesr")
    assert {w.filename for w in method.weights} >= {"stablesr_000117.ckpt", "vqgan_cfw_00011.ckpt", "v2-1_512-ema-pruned.safetensors"}
    with pytest.raises(OptionError):
        method.options.validate({"color_fix": "nofix"})
    assert method.options.validate({"steps": 4})["dec_w"] == 0.5


def test_cli_end_to_end(tiny, tmp_path):
    from PIL import Image

    from diffsr.cli.main import main

    source = save_png(tmp_path / "in" / "photo.png", gradient_image(16, 24, seed=6))
    code = main(["upscale", "-q", str(source), "-o", str(tmp_path / "out"), "--method", "stablesr", "--weights", str(tiny.ckpt),
                 "--cfw", str(tiny.cfw), "--base", str(tiny.base_dir), "--steps", "2", "--input-size", "64",
                 "--latent-tile", "8", "--latent-overlap", "4", "--seed", "0", "--device", "cpu", "--color-fix", "wavelet"])
    assert code == 0
    assert Image.open(tmp_path / "out" / "photo_out.png").size == (96, 64)
