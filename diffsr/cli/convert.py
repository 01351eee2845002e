"""`diffsr convert --method NAME CHECKPOINT [-o OUT.safetensors]`: an official checkpoint as safetensors.

The official StableSR, OSEDiff, SUPIR and InvSR files are pickles. The method's `convert` reads one
without unpickling code (`torch.load(weights_only=True)`) and returns the tensors its loader needs; they
are written as safetensors, which load faster, memory-mapped, and can never run code. The method's
`load` accepts the converted file wherever it accepts the original.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from diffsr.io.atomic import atomic_path
from diffsr.models.loading import WeightsError
from diffsr.registry import METHOD_MODULES, get_method


def register(subparsers: argparse._SubParsersAction, argv: list[str]) -> None:
    parser = subparsers.add_parser("convert", help="convert an official method checkpoint to safetensors",
                                   description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("checkpoint", type=Path, help="the official checkpoint file")
    parser.add_argument("--method", required=True, choices=sorted(METHOD_MODULES), help="the method the checkpoint belongs to")
    parser.add_argument("-o", "--output", type=Path, help="output file (default: the checkpoint's name with .safetensors, beside it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=run)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(method_name: str, source: Path, output: Path, overwrite: bool = False) -> int:
    """Write `source` converted by the method's `convert` to `output`; returns the number of tensors."""
    from safetensors.torch import save_file

    method = get_method(method_name)
    if method.convert is None:
        raise WeightsError(f"method {method_name} has no checkpoint to convert (its weights load as they are)")
    if output.resolve() == source.resolve():
        raise WeightsError(f"{output}: the output would replace the checkpoint itself; choose another -o")
    if output.exists() and not overwrite:
        raise WeightsError(f"{output} exists; pass --overwrite to replace it")
    tensors = {name: t.contiguous() for name, t in method.convert(source).items()}
    metadata = {"diffsr_method": method_name, "source": source.name, "source_sha256": _sha256(source)}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return len(tensors)


def run(args: argparse.Namespace) -> int:
    output = args.output or args.checkpoint.with_suffix(".safetensors")
    try:
        count = convert_checkpoint(args.method, args.checkpoint, output, args.overwrite)
    except (WeightsError, ValueError, OSError) as exc:
        print(f"diffsr: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({count} tensors)")
    return 0
