"""Adapter registry. The contract (handle, hooks, injection routine, delta wrappers) lives in
:mod:`vision_peft.adapters.base`; each method is one file that registers itself on import.
"""

from __future__ import annotations

from vision_peft.adapters import (  # noqa: E402,F401  (each registers itself)
    adalora,
    baselines,
    capaboost,
    detris,
    dora,
    flora,
    hut,
    kind,
    lora,
    lst,
    moment_probing,
    pad_prompt,
    point_adapter,
    prompt_map,
    pvera,
    sara,
    vpt,
)
from vision_peft.adapters.base import (
    ADAPTERS,
    AdapterHandle,
    DeltaLinear,
    Target,
    WeightDelta,
    add_weight_delta,
    apply_adapter,
    delta_handle,
    find_targets,
    fold_weight_delta,
    inject,
    inject_seeded,
    mc_sampling,
    merge_targets,
    merged_linear,
    set_module,
)

__all__ = [
    "ADAPTERS", "AdapterHandle", "DeltaLinear", "Target", "WeightDelta", "add_weight_delta", "apply_adapter",
    "delta_handle", "find_targets", "fold_weight_delta", "inject", "inject_seeded", "mc_sampling", "merge_targets",
    "merged_linear", "set_module",
]  # fmt: skip
