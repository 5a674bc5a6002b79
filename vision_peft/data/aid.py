"""The AID few-shot class split: the one list of which AID scene classes are base, validation and novel.

AID (Xia et al., "AID: A Benchmark Data Set for Performance Evaluation of Aerial Scene Classification", TGRS
2017) has 30 scene classes. The split (``data/README.md``): the 30 class names sorted alphabetically and permuted
with numpy ``RandomState(0)``; the first 16 are the base classes (meta-training, diffusion pre-training), the next
7 validation, the last 7 novel (few-shot testing, diffusion adaptation). Recipes may name their own split.
"""

from __future__ import annotations

import copy

AID_BASE: tuple[str, ...] = (
    "BaseballField", "StorageTanks", "Meadow", "Farmland", "Square", "School", "Stadium", "Forest",
    "Parking", "Resort", "Center", "Park", "DenseResidential", "MediumResidential", "River", "Port",
)  # fmt: skip
AID_VAL: tuple[str, ...] = ("BareLand", "Viaduct", "Church", "Bridge", "Playground", "Pond", "Desert")
AID_NOVEL: tuple[str, ...] = (
    "Commercial", "SparseResidential", "Beach", "Airport", "RailwayStation", "Mountain", "Industrial",
)  # fmt: skip


def aid_class_split() -> dict[str, list[str]]:
    """A fresh ``{"base", "val", "novel"}`` dict of class-name lists (safe to modify)."""
    return copy.deepcopy({"base": list(AID_BASE), "val": list(AID_VAL), "novel": list(AID_NOVEL)})
