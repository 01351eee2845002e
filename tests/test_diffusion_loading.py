"""Base and checkpoint loading: tiny models written both ways, and the official fixtures' original-layout files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shared_path

from diffsr.diffusion.bases import BASES, BaseSpec, TextEncoderSpec
from diffsr.diffusion.loading import (
    clip_tokenizer,
    load_base,
    load_method_checkpoint,
    read_state_dict,
)
from diffsr.diffusion.tiny import build_tiny_sd2, build_tiny_sdxl
from diffsr.diffusion.weights import describe_files, method_weight_files
from diffsr.models.loading import WeightsError

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return build_tiny_sd2(tmp_path_factory.mktemp("sd2"), "sd21-base")


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("which", ["tiny_sd2", "tiny_sdxl"])
def test_single_file_matches_folder(which, request):
    tiny = request.getfixturevalue(which)
    folder = load_base(tiny.diffusers_dir, tiny.kind)
    for source in (tiny.single_file, tiny.lightning_ckpt):
        single = load_base(source, tiny.kind, config_dir=tiny.diffusers_dir)
        _same_weights(folder.unet, single.unet)
        _same_weights(folder.vae, single.vae)
        assert len(single.text_encoders) == len(BASES[tiny.kind].text_encoders)
        for a, b in zip(folder.text_encoders, single.text_encoders):
            _same_weights(a, b)
        assert type(single.scheduler) is type(folder.scheduler)
        assert [t.pad_token for t in single.tokenizers] == [e.pad_token for e in BASES[tiny.kind].text_encoders]
    ids = torch.tensor([folder.tokenizers[0]("a photo of a cat", padding="max_length", max_length=77).input_ids])
    assert torch.allclose(folder.text_encoders[0](ids)[0], single.text_encoders[0](ids)[0])


def test_dtype_and_subset(tiny_sd2):
    loaded = load_base(tiny_sd2.single_file, "sd21-base", dtype=torch.float16, config_dir=tiny_sd2.diffusers_dir, components=("vae",))
    assert loaded.unet is None and not loaded.text_encoders
    assert next(loaded.vae.parameters()).dtype == torch.float16


def test_clear_errors(tiny_sd2, tmp_path):
    with pytest.raises(WeightsError, match="not found.*huggingface.co/stabilityai/stable-diffusion-2-1-base"):
        load_base(tmp_path / "nothing.safetensors", "sd21-base")
    with pytest.raises(WeightsError, match="no unet/"):
        load_base(tmp_path, "sd21-base")
    # A tiny file is not SD 2.1: the built-in full-size configs reject it by shape, naming the expected files.
    with pytest.raises(WeightsError, match="UNet does not match sd21-base.*v2-1_512-ema-pruned"):
        load_base(tiny_sd2.single_file, "sd21-base", components=("unet",))
    with pytest.raises(WeightsError, match="has no text encoder"):
        load_base(tiny_sd2.single_file, "sdxl-base", config_dir=tiny_sd2.diffusers_dir, components=("text_encoder",))
    with pytest.raises(ValueError, match="unknown base model"):
        load_base(tiny_sd2.single_file, "sd3")


def test_method_checkpoints(tmp_path):
    torch.save({"state_dict": {"module.encoder.conv_in.weight": torch.ones(2)}, "global_step": 3}, tmp_path / "np.pth")
    state = load_method_checkpoint(tmp_path / "np.pth", "invsr", ("encoder.",))
    assert list(state) == ["encoder.conv_in.weight"]
    with pytest.raises(WeightsError, match="not a invsr checkpoint.*noise_predictor_sd_turbo_v5.pth.*OAOA/InvSR"):
        load_method_checkpoint(tmp_path / "np.pth", "invsr", ("model.control_model.",))

    # Lightning pickles callback objects next to the weights; any class outside torch's allow-list stands for them.
    torch.save({"state_dict": {"w": torch.ones(1)}, "callbacks": Callback()}, tmp_path / "pl.ckpt")
    with pytest.raises(WeightsError, match="arbitrary unpickling.*stablesr_000117.ckpt"):
        load_method_checkpoint(tmp_path / "pl.ckpt", "stablesr")
    names = [f.filename for f in method_weight_files("supir")]
    assert names[:2] == ["SUPIR-v0Q.ckpt", "SUPIR-v0F.ckpt"] and "sd_xl_base_1.0.safetensors" in names
    assert "no published checkpoint" in describe_files("promptsr")


class Callback:
    pass


def _text_spec(**config) -> TextEncoderSpec:
    base = dict(BASES["sd21-base"].text_encoders[0].config, vocab_size=49408, max_position_embeddings=77)
    base.update(config)
    return base


def test_stablesr_fixture_vae_and_openclip():
    """The official tiny StableSR checkpoint (Lightning layout): its SD VAE and penultimate OpenCLIP text tower."""
    root = shared_path("fixtures", "stablesr")
    base = BASES["sd21-base"]
    vae = dict(base.vae, block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    text = _text_spec(hidden_size=8, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1)
    spec = BaseSpec("stablesr-tiny", "", base.unet, vae, (TextEncoderSpec("CLIPTextModel", text, "!", "cond_stage_model.model.", "openclip"),),
                    base.scheduler, ("stablesr_tiny.ckpt",), "fixture", "")
    BASES["stablesr-tiny"] = spec
    try:
        loaded = load_base(root / "weights" / "stablesr_tiny.ckpt", "stablesr-tiny", components=("vae", "text_encoder", "tokenizer"))
    finally:
        del BASES["stablesr-tiny"]
    ids = loaded.tokenizers[0]([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, :3].tolist() == [49406, 49407, 0]
    with torch.no_grad():
        cond = loaded.text_encoders[0](ids)[0]
    assert np.abs(cond.numpy() - np.load(root / "expected" / "cond_empty_prompt.npy")).max() <= 1e-5
    assert loaded.vae.decoder.mid_block.attentions[0].to_q.weight.ndim == 2  # 1x1 convs became linears


def test_supir_fixture_sdxl_single_file():
    """The tiny SDXL file in sgm layout: UNet and VAE load strictly; both text encoders reproduce crossattn."""
    root = shared_path("fixtures", "supir")
    case = json.loads((root / "cases.json").read_text())["cases"]["a_default"]
    base = BASES["sdxl-base"]
    clip_l = json.loads((root / "configs" / "clip-l-tiny" / "config.json").read_text())
    big_g = _text_spec(hidden_size=8, intermediate_size=32, num_attention_heads=2, num_hidden_layers=3, projection_dim=8)
    unet = dict(base.unet, block_out_channels=[32, 64, 64], attention_head_dim=[1, 1, 1], cross_attention_dim=16,
                transformer_layers_per_block=[1, 1, 1], addition_time_embed_dim=32, projection_class_embeddings_input_dim=200)
    vae = dict(base.vae, block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    texts = (TextEncoderSpec("CLIPTextModel", clip_l, "<|endoftext|>", "conditioner.embedders.0.transformer.", "hf"),
             TextEncoderSpec("CLIPTextModelWithProjection", big_g, "!", "conditioner.embedders.1.model.", "openclip"))
    BASES["sdxl-tiny"] = BaseSpec("sdxl-tiny", "", unet, vae, texts, base.scheduler, (), "fixture", "", "StableDiffusionXLPipeline")
    try:
        loaded = load_base(root / "weights" / "sdxl_base_tiny.safetensors", "sdxl-tiny")
    finally:
        del BASES["sdxl-tiny"]
    tokens = case["tokens"]
    ids_l = loaded.tokenizers[0](case["prompt_c"], padding="max_length", max_length=77, truncation=True).input_ids
    ids_g = loaded.tokenizers[1](case["prompt_c"], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids_l == tokens["tokens_clip_l_c"] and ids_g == tokens["tokens_openclip_c"]
    with torch.no_grad():
        hidden_l = loaded.text_encoders[0](torch.tensor([ids_l]), output_hidden_states=True).hidden_states[11]
        hidden_g = loaded.text_encoders[1](torch.tensor([ids_g]), output_hidden_states=True).hidden_states[-2]
    crossattn = torch.cat([hidden_l, hidden_g], dim=-1).numpy()
    expected = np.load(root / "expected" / "common" / "A_Canon_10_x1_crop" / "cond_c_crossattn.npy")
    assert np.abs(crossattn - expected).max() <= 1e-5
    assert loaded.unet.add_embedding.linear_1.in_features == 200


def test_read_state_dict_rejects_empty(tmp_path):
    torch.save({"global_step": 1}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="holds no tensors"):
        read_state_dict(tmp_path / "empty.pth")


def test_real_clip_tokenizer_pads():
    assert clip_tokenizer("!")("a", padding="max_length", max_length=5).input_ids == [49406, 320, 49407, 0, 0]
    assert clip_tokenizer("<|endoftext|>")("a", padding="max_length", max_length=5).input_ids == [49406, 320, 49407, 49407, 49407]
