"""Weights: the ncnn reader, conversion of the shipped default models, official and community files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from diffsr.models.defaults import DEFAULT_MODELS, convert_ncnn, default_state_dict, ncnn_files
from diffsr.models.loading import WeightsError, load_checkpoint
from diffsr.models.ncnn import NcnnFormatError, read_model
from diffsr.pipelines.feedforward import load_descriptor
from tiny_models import compact_state, rrdb_state, save_pth, write_ncnn_compact


@pytest.mark.parametrize("fp16", [True, False])
def test_ncnn_reader_recovers_weights(tmp_path, fp16):
    state = compact_state()
    param, binary = write_ncnn_compact(tmp_path, state, fp16=fp16)
    converted = convert_ncnn(read_model(param, binary), "compact")
    assert set(converted) == set(state)
    for key, value in state.items():
        tolerance = 1e-3 * value.abs().max().item() if fp16 and value.ndim == 4 else 0
        assert torch.allclose(converted[key], value, atol=tolerance, rtol=0), key


def test_ncnn_reader_rejects_mismatched_files(tmp_path):
    param, binary = write_ncnn_compact(tmp_path, compact_state())
    data = binary.read_bytes()
    binary.write_bytes(data[:-10])
    with pytest.raises(NcnnFormatError, match="truncated"):
        read_model(param, binary)
    binary.write_bytes(data + b"\0" * 8)
    with pytest.raises(NcnnFormatError, match="left over"):
        read_model(param, binary)
    param.write_text("12345\n1 1\n")
    with pytest.raises(NcnnFormatError, match="magic"):
        read_model(param, binary)


@pytest.mark.parametrize("name", sorted(DEFAULT_MODELS))
def test_default_models_convert_and_load_through_spandrel(name):
    descriptor, info = load_descriptor(name)
    model = DEFAULT_MODELS[name]
    assert info.scale == model.scale and info.network_scale == 4
    assert descriptor.architecture.id == ("ESRGAN" if model.architecture == "rrdb" else "Compact")
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        assert descriptor(x).shape == (1, 3, 32, 32)


def test_x4plus_has_the_official_key_layout_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path))
    state = default_state_dict("realesrgan-x4plus")
    assert len(state) == 2 * 351
    assert state["conv_first.weight"].shape == (64, 3, 3, 3)
    assert state["body.22.rdb3.conv5.weight"].shape == (64, 192, 3, 3)
    assert state["conv_last.weight"].shape == (3, 64, 3, 3)
    cached = tmp_path / "models" / "realesrgan-x4plus.safetensors"
    assert cached.is_file()
    mtime = cached.stat().st_mtime_ns
    again = default_state_dict("realesrgan-x4plus")
    assert cached.stat().st_mtime_ns == mtime  # served from the cache, not converted again
    assert torch.equal(again["conv_hr.weight"], state["conv_hr.weight"])
    cached.write_bytes(b"damaged")
    assert torch.equal(default_state_dict("realesrgan-x4plus")["conv_hr.weight"], state["conv_hr.weight"])


def test_default_model_files_are_found_through_the_distribution():
    param, binary = ncnn_files(DEFAULT_MODELS["realesrgan-x4plus"])
    assert param.name == "realesrgan-x4plus.param" and binary.stat().st_size > 30_000_000


@pytest.mark.parametrize("key", ["params_ema", "params", None])
def test_official_release_layout_loads(tmp_path, key):
    path = save_pth(tmp_path / "RealESRGAN_x4plus.pth", rrdb_state(), key=key)
    descriptor, info = load_descriptor(path)
    assert descriptor.architecture.id == "ESRGAN" and info.scale == 4


def test_safetensors_and_compact_community_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "compact.safetensors"
    save_file(compact_state(scale=2), path)
    descriptor, info = load_descriptor(path)
    assert descriptor.architecture.id == "Compact" and info.scale == 2


class _Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        torch.save({"params": _Evil()}, handle, pickle_module=pickle)
    with pytest.raises(WeightsError, match="arbitrary unpickling"):
        load_checkpoint(path)


def test_bad_weight_files_name_the_problem(tmp_path):
    with pytest.raises(WeightsError, match="neither a built-in model"):
        load_descriptor(tmp_path / "nope.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_checkpoint(empty)
    truncated = tmp_path / "cut.pth"
    save_pth(truncated, rrdb_state())
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(garbage)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}      ")
    with pytest.raises(WeightsError, match="safetensors"):
        load_checkpoint(broken)
    unrelated = save_pth(tmp_path / "unrelated.pth", {"foo.weight": torch.zeros(3, 3)}, key=None)
    with pytest.raises(WeightsError, match="no architecture spandrel knows"):
        load_descriptor(unrelated)
    mismatched = rrdb_state()
    mismatched["conv_up1.weight"] = torch.zeros(8, 5, 3, 3)
    with pytest.raises(WeightsError, match="do not fit"):
        load_descriptor(save_pth(tmp_path / "mismatch.pth", mismatched))


def test_converted_x4plus_matches_a_reference_forward():
    """Our key mapping + spandrel's RRDBNet equals a plain re-implementation of the graph in the .param."""
    import torch.nn.functional as F

    state = default_state_dict("realesrgan-x4plus")

    def conv(x, key, act=True):
        y = F.conv2d(x, state[f"{key}.weight"], state[f"{key}.bias"], padding=1)
        return F.leaky_relu(y, 0.2) if act else y

    def rdb(x, prefix):
        feats = [x]
        for c in range(1, 5):
            feats.append(conv(torch.cat(feats, 1), f"{prefix}.conv{c}"))
        return conv(torch.cat(feats, 1), f"{prefix}.conv5", act=False) * 0.2 + x

    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feat = conv(x, "conv_first", act=False)
        body = feat
        for b in range(23):
            body = rdb(rdb(rdb(body, f"body.{b}.rdb1"), f"body.{b}.rdb2"), f"body.{b}.rdb3") * 0.2 + body
        feat = feat + conv(body, "conv_body", act=False)
        feat = conv(F.interpolate(feat, scale_factor=2, mode="nearest"), "conv_up1")
        feat = conv(F.interpolate(feat, scale_factor=2, mode="nearest"), "conv_up2")
        expected = conv(conv(feat, "conv_hr"), "conv_last", act=False).clamp(0, 1)  # spandrel clamps outputs
        descriptor, _ = load_descriptor("realesrgan-x4plus")
        actual = descriptor(x)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-4)
