"""`diffsr describe IMAGE...`: PromptSR's degradation prompt of each LR image, from the offline describer.

The describer (a small CNN trained on diffsr's own degradation pipeline, standing in for the paper's
multimodal LLM) predicts each stage's level; the prompt is what `diffsr upscale --method promptsr`
uses when no --prompt is given. --json prints one JSON object per image with per-stage probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser("describe", help="print PromptSR's degradation prompt of LR images (offline describer)",
                                   description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("images", nargs="+", type=Path, help="LR image files")
    parser.add_argument("--json", action="store_true", help="one JSON object per image: prompt and per-stage probabilities")
    parser.add_argument("--weights", type=Path, default=None, help="describer .safetensors (default: the one shipped with diffsr)")
    parser.add_argument("--threshold", type=float, default=0.5, help="phrases below this probability are left out (default: 0.5)")
    parser.add_argument("--brackets", action="store_true", help="print prompts as \"[...]\" (the README's style)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from diffsr.data.folders import load_rgb, to_tensor
    from diffsr.io.image import ImageError
    from diffsr.models.describer import DegradationDescriber
    from diffsr.models.loading import WeightsError

    try:
        describer = DegradationDescriber.load(args.weights, device=args.device, threshold=args.threshold)
    except WeightsError as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for path in args.images:
        try:
            lr = to_tensor(load_rgb(path))[None]
        except (ImageError, OSError) as exc:
            print(f"diffsr: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            prediction = describer.describe(lr)[0]
        prompt = f"[{prediction.prompt}]" if args.brackets else prediction.prompt
        if args.json:
            print(json.dumps({"image": str(path), **prediction.to_dict(), "prompt": prompt}))
        else:
            print(f"{path}: {prompt}")
    return 1 if failed else 0
