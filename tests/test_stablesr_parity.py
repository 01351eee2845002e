"""StableSR parity with the official scripts (IceClear/StableSR @ 398ee93) on the fixture's tiny models.

The cases come from the fixture's own manifest.json (folder: $DIFFSR_FIXTURE_STABLESR, default
../shared/fixtures/stablesr), the official noise is injected in the recorded order, and every output
must match within the fixture README's tolerance: max |diff| <= 1e-4 on the float output. Cases of
the center-crop ("old") script that differ only in colour fix / CFW weight share one sampling run.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import SHARED
from stablesr_fixture import OLD_SCRIPT, Case, cases, fixture_root, load_models

from diffsr.diffusion.runtime import NoiseSource
from diffsr.io.image import ImageData
from diffsr.pipelines.stablesr import StableSRPipeline, to_pixels

TOLERANCE = 1e-4
CONTEXT_TOLERANCE = 1e-5


def _case_names() -> list[str]:
    root = os.environ.get("DIFFSR_FIXTURE_STABLESR", str(SHARED / "fixtures" / "stablesr"))
    try:
        return list(json.loads(open(os.path.join(root, "manifest.json")).read())["cases"])
    except OSError:
        return ["<fixture absent>"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    root = fixture_root()
    found = {case.name: case for case in cases(root)}
    first = next(iter(found.values()))
    return root, found, StableSRPipeline(load_models(root, first.data))


@pytest.fixture(scope="module")
def shared_sampling() -> dict:
    """sampling key -> [(stem, Sampled, NoiseSource)], filled by the first case of each group."""
    return {}


def _drawn_in_official_order(case: Case, noise: NoiseSource) -> None:
    assert noise.remaining() == 0, f"{case.name}: {noise.remaining()} recorded draws were not used"
    assert noise.drawn == case.roles(), f"{case.name}: draws {noise.drawn} vs official {case.roles()}"


def test_empty_prompt_embedding(fixture):
    root, _, pipeline = fixture
    expected = np.load(root / "expected" / "cond_empty_prompt.npy")
    assert np.abs(pipeline.models.context.numpy() - expected).max() <= CONTEXT_TOLERANCE


@pytest.mark.parametrize("name", _case_names())
def test_official_case(fixture, shared_sampling, name):
    root, found, pipeline = fixture
    case = found[name]
    options = case.run_options()
    failures = []
    if case.script == OLD_SCRIPT:
        key = case.sampling_key()
        if key not in shared_sampling:
            noise = NoiseSource(injected=case.noise())
            shared_sampling[key] = [(stem, pipeline.center_crop_sample(rgb, options["input_size"], noise, steps=options["steps"]))
                                    for stem, rgb in case.inputs()]
            _drawn_in_official_order(case, noise)
        results = [(stem, to_pixels(pipeline.finish(sampled, options["dec_w"], options["color_fix"])))
                   for stem, sampled in shared_sampling[key]]
    else:
        noise = NoiseSource(injected=case.noise())
        results = [(stem, pipeline.upscale(ImageData(rgb), noise=noise, **options).pixels) for stem, rgb in case.inputs()]
        _drawn_in_official_order(case, noise)
    for stem, out in results:
        expected = case.expected(stem)
        assert out.shape == expected.shape, f"{name}/{stem}: shape {out.shape} vs official {expected.shape}"
        diff = np.abs(out.astype(np.float64) - expected)
        print(f"{name}/{stem}: max |diff| {diff.max():.2e}, mean {diff.mean():.2e}")
        if diff.max() > TOLERANCE:
            failures.append(f"{stem}: max |diff| {diff.max():.3g} > {TOLERANCE}")
    assert not failures, f"{name}: " + "; ".join(failures)


def test_upscale_center_crop_is_sample_then_finish(fixture):
    """The registry's upscale() in center-crop mode is exactly the sample/finish pair the grouped cases use."""
    _, found, pipeline = fixture
    case = next((c for c in found.values() if c.script == OLD_SCRIPT), None)
    if case is None:
        pytest.skip("the fixture has no center-crop (old script) case")
    options = dict(case.run_options(), steps=1, input_size=64)  # small: 8 x 8 latents
    stem, rgb = case.inputs()[0]
    draws = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    full = pipeline.upscale(ImageData(rgb), noise=NoiseSource(injected=draws), **options).pixels
    sampled = pipeline.center_crop_sample(rgb, 64, NoiseSource(injected=draws), steps=1)
    assert full.shape == (64, 64, 3)
    assert np.array_equal(full, to_pixels(pipeline.finish(sampled, options["dec_w"], options["color_fix"])))
