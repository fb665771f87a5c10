"""The detector of a checkpoint and its per-sample thresholds, read from the state file.

The state file's metadata records the loss's configuration (detector name and settings) and
N. The detector is rebuilt through the registry and its state restored with the same checks
as a resume (:func:`glofnd_hf.state_file.load_detector_state`); a checkpoint of a run with
``state_sharding: sharded`` (one shard file per process, the state file their manifest) is
assembled into the same full table, in this process and in O(N) memory. Detectors that learn a
threshold per sample (their state is a :class:`~glofnd_hf.fnd.thresholds.ThresholdState`,
GloFND's) give their thresholds; ``batch_quantile`` has a threshold *rule* instead, which the
inspection applies to the whole data set. Any other detector is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import STATE_FILE
from ..fnd import registry
from ..fnd.registry import SharedSettings
from ..fnd.thresholds import LAMBDA, ThresholdState
from ..state_file import StateFileError, load_detector_state, read_state_config
from .errors import InspectionError

__all__ = ["QUANTILE_RULE_DETECTORS", "CheckpointThresholds", "load_checkpoint_thresholds"]

#: Detectors whose threshold is the anchor's (1 - alpha) quantile computed on the spot: the
#: inspection applies that rule to the whole data set (not one batch).
QUANTILE_RULE_DETECTORS = ("batch_quantile",)


@dataclass
class CheckpointThresholds:
    """What the inspection needs from a checkpoint's per-sample state."""

    detector: str
    alpha: float
    num_samples: int
    config: dict[str, Any]
    thresholds: torch.Tensor | None
    """(N, 2) float32 [image side, text side] keyed by dataset index; None for a quantile
    rule (computed per anchor over the whole data set)."""
    visits: torch.Tensor | None = field(default=None)
    """(N, 2) visits of each threshold (0: never updated, still at its initial 1.0)."""

    @property
    def learned(self) -> bool:
        return self.thresholds is not None


def load_checkpoint_thresholds(checkpoint: str | os.PathLike) -> CheckpointThresholds:
    """The detector and thresholds stored in ``checkpoint``'s ``glofnd_state.safetensors``
    (or in the per-process shards it names: every row, whatever the world size).

    Raises :class:`InspectionError` for a missing folder or state file, a state file without
    the run's configuration, and a detector without per-sample thresholds; a state file that
    does not restore raises :class:`~glofnd_hf.state_file.StateFileError` (a ValueError).
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise InspectionError(f"checkpoint {folder} is not a folder")
    path = folder / STATE_FILE
    if not path.is_file():
        raise InspectionError(
            f"{folder} has no {STATE_FILE}: glofnd-inspect needs a training checkpoint "
            "(a checkpoint-N folder; a final model folder keeps no per-sample state)"
        )
    try:
        config, num_samples = read_state_config(path)
    except StateFileError as err:
        raise InspectionError(str(err)) from err
    name = config["detector"]
    spec = registry.get(name)
    alpha = float(config.get("alpha", SharedSettings().alpha))
    if name in QUANTILE_RULE_DETECTORS:
        return CheckpointThresholds(name, alpha, num_samples, config, None)
    shared = SharedSettings(alpha=alpha, mask_start_epoch=config.get("mask_start_epoch", 0.0))
    settings = {k: config[k] for k in spec.setting_names() if k in config}
    detector = spec.build(settings, shared, num_samples=num_samples)
    state = getattr(detector, "state", None)
    if not isinstance(state, ThresholdState):
        raise InspectionError(
            f"{folder} was trained with the {name!r} detector ({spec.description}), which "
            f"keeps no per-sample thresholds; glofnd-inspect shows detectors that learn one "
            f"(glofnd) and the quantile rule of {', '.join(QUANTILE_RULE_DETECTORS)}"
        )
    load_detector_state(path, detector, num_samples)
    rows = state.table.data.float().cpu()  # (N, 2, columns)
    return CheckpointThresholds(
        name,
        alpha,
        num_samples,
        config,
        thresholds=rows[..., LAMBDA].clone(),
        visits=rows[..., -1].clone(),
    )
