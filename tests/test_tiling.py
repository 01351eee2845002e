"""Tiled inference: grid, blending weights, equality with the untiled result, out-of-memory retry."""

from __future__ import annotations

import torch

from diffsr.tiling import TiledRunner, feather, split_axis


def test_split_axis_covers_the_axis_with_balanced_cores():
    spans = split_axis(100, 32, 8)
    assert [s.start for s in spans] == [0, 25, 50, 75] and spans[-1].stop == 100
    assert all(s.stop - s.start == 25 for s in spans)
    assert spans[0].lo == 0 and spans[1].lo == 17 and spans[-1].hi == 100
    assert split_axis(10, 64, 8) == split_axis(10, 10, 8)


def test_feather_weights_form_a_partition_of_unity():
    spans = split_axis(100, 32, 8)
    total = torch.zeros(200)
    for span in spans:
        weight = feather(span, scale=2)
        assert weight.numel() == (span.hi - span.lo) * 2
        total[span.lo * 2 : span.hi * 2] += weight
    assert torch.allclose(total, torch.ones(200))
    inner = feather(spans[1], scale=2)
    assert torch.all(inner[:12] == 0) and torch.all(inner[20:-20] == 1)  # no weight near the window's edge


def _local_net(scale: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3 * scale * scale, 3, padding=1),
        torch.nn.PixelShuffle(scale),
    ).eval()


def test_tiled_equals_untiled_once_overlap_exceeds_the_receptive_field():
    net = _local_net()
    image = torch.rand(1, 3, 70, 90)
    with torch.inference_mode():
        whole = net(image)
        tiled = TiledRunner(net, 2, tile=24, overlap=4, device=torch.device("cpu"))(image)
        too_little = TiledRunner(net, 2, tile=24, overlap=0, device=torch.device("cpu"))(image)
    assert torch.allclose(tiled, whole, atol=1e-5)
    assert (too_little - whole).abs().max() > 1e-3  # the check can fail: without overlap the seams show


def test_out_of_memory_tiles_are_retried_smaller():
    net = _local_net()
    calls = []

    def picky(window: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(window.shape[-2:]))
        if max(window.shape[-2:]) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return net(window)

    seen = []
    image = torch.rand(1, 3, 64, 64)
    runner = TiledRunner(picky, 2, tile=64, overlap=4, device=torch.device("cpu"), on_progress=seen.append)
    with torch.inference_mode():
        out = runner(image)
        whole = net(image)
    assert runner.smallest_tile_used == 32
    assert torch.allclose(out, whole, atol=1e-5)
    assert seen[-1].done == seen[-1].total == 4


def test_other_errors_are_not_swallowed():
    def broken(window: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch in layer 3")

    runner = TiledRunner(broken, 2, tile=16, overlap=2, device=torch.device("cpu"))
    try:
        runner(torch.rand(1, 3, 20, 20))
    except RuntimeError as exc:
        assert "shape mismatch" in str(exc)
    else:
        raise AssertionError("error was swallowed")
