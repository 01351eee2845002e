"""OSEDiff against the official code's outputs: every case of the fixture folder's own case list.

The folder is $DIFFSR_FIXTURE_OSEDIFF, default ../shared/fixtures/osediff; any folder of the same layout
(cases.json, inputs/, expected/, the tiny base and the official-format .pkl) works, so a case added there
needs no change here. Tolerances are the fixture README's. Runs whose model output cannot differ (the
colour-fix cases re-run case a's model) are computed once and shared.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fixture_folder
from PIL import Image

FIXTURE = fixture_folder("osediff")
CASES_FILE = FIXTURE / "cases.json"
ABSENT = f"{CASES_FILE} is absent (set DIFFSR_FIXTURE_OSEDIFF to an OSEDiff fixture folder)"

MODEL_ARGS = ("seed", "process_size", "upscale", "mixed_precision", "merge_and_unload_lora", "vae_encoder_tiled_size",
              "vae_decoder_tiled_size", "latent_tiled_size", "latent_tiled_overlap", "user_prompt")
"""Arguments that change the model output (the colour fix does not)."""


def _spec() -> dict[str, Any]:
    return json.loads(CASES_FILE.read_text()) if CASES_FILE.is_file() else {"cases": [], "inputs": []}


SPEC = _spec()
PAIRS = [(case["name"], entry["stem"]) for case in SPEC["cases"] for entry in SPEC["inputs"]] or [pytest.param(None, None, marks=pytest.mark.skip(reason=ABSENT))]
STEMS = [entry["stem"] for entry in SPEC["inputs"]] or [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT))]
CASES = {case["name"]: case for case in SPEC["cases"]}


@lru_cache(maxsize=4)
def _pipeline(dtype: str, merge: bool):
    from diffsr.pipelines.osediff import load

    return load(str(FIXTURE / SPEC.get("osediff_weights", "osediff_tiny.pkl")), str(FIXTURE / SPEC.get("model_dir", "sd-tiny")),
                merge_lora=merge, device="cpu", dtype=dtype)


def _model_key(case: dict[str, Any]) -> tuple:
    return tuple(case["args"].get(k) for k in MODEL_ARGS) + (case.get("caption_in_place_of_RAM", ""),)


@lru_cache(maxsize=None)
def _run(key: tuple, stem: str) -> dict[str, Any]:
    """One pipeline run through the public `upscale` path, with its intermediates recorded."""
    from diffsr.io.image import read_image

    args = dict(zip(MODEL_ARGS, key[:-1]))
    if args["mixed_precision"] != "fp32":
        pytest.skip(f"case needs {args['mixed_precision']}, which the CPU parity run does not reproduce")
    pipeline = _pipeline("fp32", bool(args["merge_and_unload_lora"]))
    record: dict[str, Any] = {}
    with torch.random.fork_rng():
        pipeline.upscale(read_image(FIXTURE / "inputs" / f"{stem}.png"), prompt=args["user_prompt"], tags=key[-1],
                         upscale=args["upscale"], process_size=args["process_size"], align_method="nofix", resize_back=False,
                         latent_tile=args["latent_tiled_size"], latent_overlap=args["latent_tiled_overlap"],
                         vae_encoder_tile=args["vae_encoder_tiled_size"], vae_decoder_tile=args["vae_decoder_tiled_size"],
                         vae_statistics="vaehook", seed=args["seed"], record=record)
    return record


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16).transpose(2, 0, 1)


def _levels(x: np.ndarray) -> np.ndarray:
    """The official ToPILImage quantisation of a [0, 1] float image: floor(255 x), in float32."""
    return np.floor(np.clip(x, 0, 1).astype(np.float32) * np.float32(255)).astype(np.int16)


def _png_agrees(ours: np.ndarray, png: np.ndarray, max_levels: int) -> None:
    differ = ours != png
    assert differ.mean() <= 0.005, f"{differ.mean():.3%} of 8-bit values differ"
    assert np.abs(ours - png).max() <= max_levels


@pytest.mark.parametrize("stem", STEMS)
def test_preprocessing_matches_official(stem):
    """The Pillow resizes give the official preprocessed 8-bit image bit for bit."""
    from diffsr.io.image import read_image
    from diffsr.pipelines.osediff import preprocess

    args = SPEC["cases"][0]["args"]
    pre = preprocess(read_image(FIXTURE / "inputs" / f"{stem}.png").pixels, args["upscale"], args["process_size"])
    expected = np.asarray(Image.open(FIXTURE / "expected" / "preprocessed" / f"{stem}.png").convert("RGB"), dtype=np.float32) / 255
    assert pre.pixels.shape == expected.shape
    assert np.array_equal(pre.pixels, expected)
    entry = next(e for e in SPEC["inputs"] if e["stem"] == stem)
    assert pre.pre_resized == entry.get("pre_resize_applied", pre.pre_resized)


@pytest.mark.skipif(not SPEC.get("tokens"), reason=ABSENT)
def test_prompt_token_ids():
    """The official prompt string tokenises to the official ids (pad '!' = id 0, SD 2's tokenizer)."""
    pipeline = _pipeline("fp32", False)
    for case in SPEC["cases"]:
        from diffsr.pipelines.osediff import build_prompt

        assert build_prompt(case.get("caption_in_place_of_RAM", ""), case["args"]["user_prompt"]) == case["prompt"]
    for text, expected in SPEC["tokens"].items():
        ids = pipeline.tokenizer(text, max_length=77, padding="max_length", truncation=True).input_ids
        assert ids == expected["ids"]


@pytest.mark.parametrize("case_name,stem", PAIRS)
def test_case_matches_official(case_name, stem):
    """Float output within max 2e-4 / mean 1e-5 (colour fixes: 1e-5 in isolation, mean 2e-5 end to end) and the PNG."""
    from diffsr.pipelines.osediff import COLOR_FIX_NAMES, Preprocessed, fix_colours

    case = CASES[case_name]
    folder = FIXTURE / "expected" / case_name
    record = _run(_model_key(case), stem)
    expected = np.load(folder / f"{stem}.npy")
    output = case["outputs"][stem]
    align = case["args"]["align_method"]
    if COLOR_FIX_NAMES[align] == "none":
        ours = record["restored"][0].numpy()
        assert list(ours.shape) == output["npy_shape_chw"]
        diff = np.abs(ours - expected)
        assert diff.max() <= 2e-4 and diff.mean() <= 1e-5, (diff.max(), diff.mean())
        _png_agrees(_levels(ours * 0.5 + 0.5), _png(folder / f"{stem}.png"), 1)
        tolerances = {"prompt_embeds": 1e-5, "lq_latent": 1e-5, "model_pred": 1e-4, "x_denoised": 2e-3}
        for name, info in output.get("intermediates", {}).items():
            stored = np.load(FIXTURE / info["file"])
            assert np.abs(record[name].numpy() - stored).max() <= tolerances.get(name, 1e-4), name
        return
    pipeline = _pipeline("fp32", False)
    pre: Preprocessed = record["preprocessed"]
    # in isolation: the official target (the no-fix case's PNG) and source (the preprocessed input)
    plain = next((c["name"] for c in SPEC["cases"] if _model_key(c) == _model_key(case)
                  and COLOR_FIX_NAMES[c["args"]["align_method"]] == "none"), None)
    if plain is not None:
        target = torch.from_numpy(_png(FIXTURE / "expected" / plain / f"{stem}.png").astype(np.float32) / 255)[None]
        isolated = fix_colours(target, pre, align)[0].numpy()
        assert np.abs(isolated - expected).max() <= 1e-5
    # end to end: our own 8-bit output as the target
    fixed = pipeline.finish(record["restored"], pre, align)[0].numpy()
    assert list(fixed.shape) == output["npy_shape_chw"]
    assert np.abs(fixed - expected).mean() <= 2e-5
    _png_agrees(_levels(fixed), _png(folder / f"{stem}.png"), 2)
