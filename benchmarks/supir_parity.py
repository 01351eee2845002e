"""Print SUPIR's agreement with the official test.py, per fixture case and stage (max / mean |diff|).

NON-COMMERCIAL method (diffsr.noncommercial). Reads the fixture folder's own case list, as
tests/test_supir.py does (DIFFSR_FIXTURE_SUPIR, default ../shared/fixtures/supir), injects the
official random draws and compares every stored intermediate; the tiny networks run on one thread.

    PYTHONPATH=. python benchmarks/supir_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from supir_fixture import base_spec, cases, fixture_root  # noqa: E402

from diffsr.diffusion.runtime import NoiseSource  # noqa: E402
from diffsr.noncommercial.supir.pipeline import SUPIRPipeline, resolve_settings  # noqa: E402

STAGES = (("stage1_latent", "control_latent", "stage1_latent.npy"), ("x_stage1", "stage1", "x_stage1.npy"),
          ("z_stage1", "center_latent", "z_stage1.npy"), ("final_latent", "final_latent", "final_latent.npy"),
          ("output", "output", "output.npy"))


def main() -> None:
    torch.set_num_threads(1)
    root = fixture_root()
    pipeline = SUPIRPipeline.from_files(root / "weights" / "supir_v0Q_tiny.ckpt", root / "weights" / "sdxl_base_tiny.safetensors",
                                        device="cpu", dtype="fp32", base_spec=base_spec(root), accept_licence=True)
    print("| case | " + " | ".join(name for name, _, _ in STAGES) + " | output max / max|ref| |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for case in cases(root):
        result = pipeline.restore(case.lq(), resolve_settings(case.run_values()), NoiseSource(injected=case.draws()))
        cells = []
        for _, attribute, file in STAGES:
            ref = case.array(file)
            diff = np.abs(getattr(result, attribute).numpy().reshape(ref.shape) - ref)
            cells.append(f"{diff.max():.1e} / {diff.mean():.1e}")
        ref = case.array("output.npy")
        relative = np.abs(result.output.numpy() - ref).max() / np.abs(ref).max()
        print(f"| {case.name} | " + " | ".join(cells) + f" | {relative:.1e} |")


if __name__ == "__main__":
    main()
