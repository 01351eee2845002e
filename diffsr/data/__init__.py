"""Training and validation data: HR folders degraded on the fly, paired folders, fixed pair sets."""

from diffsr.data.folders import (
    HRFolderDataset,
    PairedFolderDataset,
    collate_pairs,
    degrade_batch,
    find_images,
    worker_init,
)
from diffsr.data.pairs import PairSummary, make_pairs, make_validation_set

__all__ = [
    "HRFolderDataset",
    "PairSummary",
    "PairedFolderDataset",
    "collate_pairs",
    "degrade_batch",
    "find_images",
    "make_pairs",
    "make_validation_set",
    "worker_init",
]
