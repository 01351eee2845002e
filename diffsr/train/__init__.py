"""Training recipes, one module per method, run by `diffsr train METHOD CONFIG`.

A recipe module defines `Config` (a dataclass whose defaults are the official recipe's values) and
`train(config: Config, output_dir: Path, on_progress=None) -> Path`, which returns the trained weights
file (in the format the method's `load` reads). The loop itself (accelerate, mixed precision, gradient
accumulation, checkpoints, resume) is shared: `diffsr.train.loop`.
"""

TRAINERS: dict[str, str] = {
    "describer": "diffsr.train.describer",  # PromptSR's degradation describer
    "invsr": "diffsr.train.invsr",
    "osediff": "diffsr.train.osediff",
    "promptsr": "diffsr.train.promptsr",
    "stablesr": "diffsr.train.stablesr",
    "supir": "diffsr.train.supir",
}
"""method name -> recipe module; each port adds its line."""
