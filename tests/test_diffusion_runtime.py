"""Runtime options, module preparation and the noise source used for parity tests."""

from __future__ import annotations

import argparse

import pytest
import torch

from diffsr.diffusion.runtime import (
    RUNTIME_OPTIONS,
    NoiseExhausted,
    NoiseSource,
    Runtime,
    latent_tiling_options,
    vae_tiling_options,
)
from diffsr.options import OptionError

pytestmark = pytest.mark.filterwarnings("ignore")


def test_options_schema_and_cli():
    merged = RUNTIME_OPTIONS + latent_tiling_options(96, 32) + vae_tiling_options(1024, 224)
    parser = argparse.ArgumentParser()
    merged.add_arguments(parser)
    values = merged.from_namespace(parser.parse_args(["--dtype", "bf16", "--seed", "7", "--channels-last", "--latent-tile", "64"]))
    assert values["dtype"] == "bf16" and values["seed"] == 7 and values["channels_last"] is True
    assert values["latent_tile"] == 64 and values["latent_overlap"] == 32 and values["vae_decoder_tile"] == 224
    assert merged.validate({})["seed"] is None
    with pytest.raises(OptionError, match="not one of"):
        merged.validate({"attention": "flash3"})
    assert {o.name for o in RUNTIME_OPTIONS.options if o.stage == "load"} == {"device", "dtype", "attention", "offload", "channels_last", "compile"}
    assert merged.json_schema()["properties"]["seed"]["type"] == ["integer", "null"]


def test_runtime_from_options_and_prepare():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from diffsr.diffusion.tiny import tiny_vae

    runtime = Runtime.from_options({"device": "cpu", "dtype": "auto", "attention": "eager", "channels_last": True})
    assert runtime.device.type == "cpu" and runtime.dtype == torch.float32
    vae = runtime.prepare(tiny_vae())
    assert isinstance(vae.decoder.mid_block.attentions[0].processor, AttnProcessor)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    sdpa = Runtime(torch.device("cpu"), torch.float16).prepare(tiny_vae())
    assert isinstance(sdpa.encoder.mid_block.attentions[0].processor, AttnProcessor2_0)
    assert next(sdpa.parameters()).dtype == torch.float16
    upcast = tiny_vae(base="sdxl-base")
    assert Runtime(torch.device("cpu"), torch.float16).module_dtype(upcast) == torch.float32  # force_upcast VAE


def test_offload_moves_only_while_active():
    moves = []

    class Recorder(torch.nn.Module):
        def to(self, *args, **kwargs):
            moves.append(str(args[0]) if args else str(kwargs.get("device")))
            return self

    runtime = Runtime(torch.device("meta"), torch.float32, offload=True)  # meta stands for the accelerator
    module = Recorder()
    with runtime.active(module):
        assert moves == ["meta"]
    assert moves == ["meta", "cpu"]
    runtime.offload = False
    with runtime.active(module):
        pass
    assert moves == ["meta", "cpu"]


def test_noise_seeded_and_injected():
    a = NoiseSource(seed=5)
    b = NoiseSource(seed=5)
    assert torch.equal(a.randn((2, 3)), b.randn((2, 3)))
    assert torch.equal(a.randn((4,), dtype=torch.float16), b.randn((4,), dtype=torch.float16))
    assert torch.equal(NoiseSource(seed=5).randn((3,)), torch.randn(3, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(NoiseSource(seed=6).randn((8,)), NoiseSource(seed=5).randn((8,)))
    given = [torch.ones(1, 4, 2, 2), torch.zeros(3)]
    source = NoiseSource(injected=given)
    assert torch.equal(source.randn((1, 4, 2, 2), role="posterior"), given[0])
    with pytest.raises(ValueError, match=r"draw 1 \(x_T\).*\(3,\).*\(2,\)"):
        source.randn((2,), role="x_T")
    assert source.drawn == [("posterior", (1, 4, 2, 2)), ("x_T", (2,))]
    empty = NoiseSource(injected=[])
    with pytest.raises(NoiseExhausted, match="no injected noise left"):
        empty.randn_like(torch.zeros(2))
    assert NoiseSource(injected=given).remaining() == 2


@pytest.mark.slow
def test_compile_matches_eager():
    """--compile: torch.compile (inductor, needs a C++ compiler on the CPU) gives the eager numbers.
    Slow (compilation takes a minute or more on 2 cores), so outside CI: pytest -m slow."""
    from diffsr.diffusion.tiny import tiny_unet

    unet = tiny_unet(seed=0)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    eager = Runtime(torch.device("cpu"), torch.float32).prepare(unet)
    with torch.no_grad():
        expected = eager(latent, 999, encoder_hidden_states=context).sample
        compiled = Runtime(torch.device("cpu"), torch.float32, compile=True).prepare(unet, denoiser=True)
        result = compiled(latent, 999, encoder_hidden_states=context).sample
    assert compiled._compiled_call_impl is not None
    assert torch.allclose(result, expected, atol=1e-4)
