"""The inference settings of GEM-3D as data (docs/method.md §5, paper Tab. 1): one engine
(:mod:`gem3d.inference.engine`) runs them all; a setting only says where the informed slice comes from, which mask
and which model are used.
"""
from __future__ import annotations

from dataclasses import dataclass

INFORMED_SOURCES = ("other_case", "generated", "own_middle", "none")
MASK_SOURCES = ("own", "edited", "none")
MODELS = ("gem3d", "baseline", "slice")


@dataclass(frozen=True)
class Setting:
    """One row of the table in docs/method.md §5.

    informed: where the informed slice comes from
        ``other_case`` a real slice of another case at the same relative position (random case and position),
        ``generated`` the position-conditioned slice model at a random position,
        ``own_middle`` the case's own slice ``num_slices // 2`` (reconstruction),
        ``none`` no informed slice (baseline, or the slice model alone).
    mask: ``own`` the case's mask, ``edited`` the icma mask edit, ``none`` unused (slice model alone).
    model: ``gem3d`` (two-stage, informed slice), ``baseline`` (mask only), ``slice`` (slice model only).
    """

    name: str
    informed: str
    mask: str
    model: str
    description: str = ""

    def __post_init__(self):
        for field, allowed in (("informed", INFORMED_SOURCES), ("mask", MASK_SOURCES), ("model", MODELS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"Setting {self.name!r}: {field}={value!r} is not one of {list(allowed)}")

    @property
    def needs_slice_model(self) -> bool:
        return self.informed == "generated" or self.model == "slice"

    @property
    def needs_volume_model(self) -> bool:
        return self.model in ("gem3d", "baseline")

    @property
    def has_ground_truth(self) -> bool:
        """Whether the real image is the sample's ground truth (``<case>_gt.nii.gz`` is written, reconstruction
        metrics are scored): only where the informed slice is the case's own and the mask its own (``test``)."""
        return self.informed == "own_middle" and self.mask == "own"


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("ic", "other_case", "own", "gem3d", "informed slice from another case, own mask"),
    Setting("icma", "other_case", "edited", "gem3d", "informed slice from another case, edited mask"),
    Setting("ig", "generated", "own", "gem3d", "generated informed slice, own mask"),
    Setting("igma", "generated", "edited", "gem3d", "generated informed slice, edited mask"),
    Setting("test", "own_middle", "own", "gem3d", "own middle slice, own mask: reconstruction"),
    Setting("base", "none", "own", "baseline", "baseline without informed slice, own mask"),
    Setting("slice", "none", "none", "slice", "slice model alone at given positions"),
)}


def get_setting(name: str) -> Setting:
    """Look a setting up by name, failing with the allowed names."""
    try:
        return SETTINGS[name]
    except KeyError:
        raise ValueError(f"unknown inference setting {name!r}; choose one of {sorted(SETTINGS)}") from None
