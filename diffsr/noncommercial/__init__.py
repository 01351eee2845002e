"""Methods whose code, weights or architecture are licensed for NON-COMMERCIAL use only.

Everything under `diffsr.noncommercial` is kept apart from the rest of diffsr (which is
permissively licensed), as spandrel keeps its non-commercial architectures in
`spandrel_extra_arches`: nothing outside this package imports it, and each method here refuses to
load until its licence has been accepted explicitly (see `require_acceptance`).

- `supir`: a re-implementation of SUPIR (Yu et al., CVPR 2024). The SUPIR Software License
  Agreement (SupPixel Pty Ltd, June 2024) allows non-commercial use only, and claims the
  network architecture as well as the code and the weights; commercial use needs written
  permission from SupPixel (jinjin.gu@suppixel.ai). diffsr never ships or downloads SUPIR weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ACCEPT_ENV = "DIFFSR_NONCOMMERCIAL"
"""Set to 1 to accept the non-commercial licences of the methods in this package."""


class LicenceNotAccepted(ValueError):
    """A non-commercial method was loaded without accepting its licence."""


def _marker(method: str) -> Path:
    from diffsr.hub import cache_dir

    return cache_dir() / "licences" / f"{method}.shown"


def require_acceptance(method: str, licence: str, accepted: bool) -> None:
    """Refuse to run `method` unless its licence was accepted; print the licence once, at first use.

    Acceptance is explicit: the load option `accept_licence=True` (CLI `--accept-licence`) or the
    environment variable DIFFSR_NONCOMMERCIAL=1.
    """
    if not (accepted or os.environ.get(ACCEPT_ENV, "").strip().lower() in ("1", "true", "yes")):
        raise LicenceNotAccepted(
            f"{method} is licensed for non-commercial use only ({licence}); pass --accept-licence "
            f"(Python: accept_licence=True) or set {ACCEPT_ENV}=1 to confirm your use is non-commercial")
    marker = _marker(method)
    if not marker.exists():
        print(f"diffsr: {method}: {licence}. Commercial use of its code, weights or architecture needs the "
              "licensor's written permission.", file=sys.stderr)
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(licence + "\n")
        except OSError:
            pass  # a read-only home: the notice is shown again next time, which is harmless
