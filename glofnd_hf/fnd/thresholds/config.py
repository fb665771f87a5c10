"""GloFND's settings (the threshold update rule, its settings and the schedule) and the
interface every update rule implements; each rule registers itself in ``RULES``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..interface import SIDES
from ..setting_types import setting
from ..table import ValueRange

LAMBDA = 0  # every rule keeps the threshold in column 0 and the visit count last
UpdateRule = Literal["pinball", "tail", "adam", "reference"]
CommonTest = Literal["within", "across"]
UPDATE_RULES: tuple[str, ...] = ("pinball", "tail", "adam", "reference")
THRESHOLD_RANGE = ValueRange(-1.0, 1.0)  # thresholds are cosine similarities (clamped)
RULES: dict[str, type[ThresholdRule]] = {}
"""The rule class of each ``update_rule`` name; each rule's module adds its own."""


@dataclass
class GloFNDConfig:
    """Settings of the GloFND detector: the threshold update and its schedule."""

    alpha: float = setting(
        1e-3,
        "Fraction of the data set taken as false negatives of each "
        "anchor (shared by every detector).",
    )
    update_rule: UpdateRule = setting(
        "pinball",
        "How thresholds learn: pinball (Newton steps on the pinball loss whose weight "
        "decays with visits and restarts when the embeddings move: rests at the quantile for "
        "any tail shape), tail (constant-gain steps sized by each anchor's fitted tail, the "
        "previous default; filters about 2.5 x alpha at alpha x batch 0.1), adam (Adam, per-sample bias correction), reference (Adam "
        "exactly as the GloFND reference code, bias correction with t = epoch + 1).",
    )
    # -- the tail rule --------------------------------------------------------------------
    tail_size: int = setting(
        8,
        "pinball and tail rules: k, the batch's top-k negatives of each anchor "
        "estimate its tail (raised to 2 x alpha x batch when larger). Smaller reads the tail "
        "nearer the quantile: on a real model's tails held still, 2 puts the step unit at "
        "the local scale (8: 7-9 times it), but follows a model in training worse "
        "(docs/threshold-tracking.md).",
    )
    band: float = setting(
        1.0,
        "tail rule: offsets from the batch's own quantile estimate "
        "beyond about band x tail scale are pulled back to it (smaller: "
        "follows drift faster; larger: averages more).",
    )
    step_floor: float = setting(
        0.5,
        "tail rule: smallest step weight; the 1/t decay stops here so thresholds follow drift. "
        "With local_step, a step up passes at most about this share of a batch's excess "
        "exceedances.",
    )
    local_step: bool = setting(
        False,
        "tail rule: size steps by the local density of similarities at the threshold where "
        "that is denser than the tail implies (a plateau of near-duplicates), and cap a step "
        "up at about step_floor of a batch's excess exceedances, instead of steps in the "
        "fitted tail's unit capped at the batch's top negative. Measured: no better than "
        "the default in the training study, worse in the demo (docs/threshold-tracking.md).",
    )
    averaging: float = setting(
        0.5,
        "tail rule: the threshold is a running mean, with this gain, of the Robbins-Monro "
        "iterate that takes the steps (Polyak averaging: smaller averages more visits and "
        "lags drift more; 1: the iterate itself).",
    )
    drift_rate: float = setting(
        0.3,
        "pinball and tail rules: rate of the running test that tells moving embeddings from batch noise "
        "(larger: reacts to drift sooner, averages less).",
    )
    # -- the pinball rule ----------------------------------------------------------------
    gain_decay: float = setting(
        0.7,
        "pinball rule: the step weight decays as 1 / age^gain_decay with the visits since the "
        "last detected drift (in (0.5, 1]; 1 is the classic 1/t, smaller forgets the start "
        "faster and is robust to a misjudged density; the threshold averages the steps).",
    )
    drift_level: float = setting(
        4.0,
        "pinball rule: how many standard deviations the running test of the batches' tail "
        "estimates against their mean must reach to count as drift, which restarts the "
        "step weight (smaller: follows moving embeddings sooner, restarts on noise more).",
    )
    restart_age: float = setting(
        2.0,
        "pinball rule: the age (visits' worth of evidence) kept when drift is detected.",
    )
    common_test: CommonTest = setting(
        "within",
        "pinball rule: what the test for a shift of every anchor's tail holds a batch's mean "
        "innovation against: within (the spread of the batch's own innovations) or across "
        "(the spread of successive batches' means, four numbers of state per side, and a "
        "restart also restarts the threshold's average). A batch's anchors share their "
        "negatives, which within does not see: on a real model's still tails it restarts "
        "13-52 % of the visits and never converges, where across does "
        "(docs/threshold-tracking.md).",
    )
    # -- the Adam rules -------------------------------------------------------------------
    lr: float = setting(0.05, "adam/reference rules: learning rate of the thresholds.")
    betas: tuple[float, float] = setting((0.9, 0.98), "adam/reference rules: Adam's betas.")
    eps: float = setting(1e-8, "adam/reference rules: Adam's epsilon.")
    clip_grad_mult: float | None = setting(
        None,
        "adam/reference rules: clip the threshold gradient to +-clip_grad_mult x alpha "
        "(None: no clipping).",
    )
    init_quantile: bool = setting(
        False,
        "adam/reference rules: on an anchor's first visit set its threshold to the "
        "in-batch (1 - alpha) quantile instead of taking a step (the tail rule always starts "
        "from the batch's estimate).",
    )
    # -- schedule -------------------------------------------------------------------------
    update_start_epoch: float = setting(0.0, "Epoch from which the thresholds learn.")
    mask_start_epoch: float = setting(
        0.0,
        "Epoch from which detected false negatives are acted on (shared by every "
        "detector; not before update_start_epoch).",
    )

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.update_rule not in RULES:  # the built-in rules and any registered since
            raise ValueError(f"update_rule must be one of {list(RULES)}, got {self.update_rule!r}")
        if (
            isinstance(self.tail_size, bool)
            or int(self.tail_size) != self.tail_size
            or self.tail_size < 1
        ):
            raise ValueError(f"tail_size must be a positive integer, got {self.tail_size}")
        self.tail_size = int(self.tail_size)
        if not self.band > 0:
            raise ValueError(f"band must be positive, got {self.band}")
        if not 0.0 < self.step_floor <= 1.0:
            raise ValueError(f"step_floor must lie in (0, 1], got {self.step_floor}")
        if not 0.0 < self.averaging <= 1.0:
            raise ValueError(f"averaging must lie in (0, 1], got {self.averaging}")
        if not 0.0 < self.drift_rate <= 1.0:
            raise ValueError(f"drift_rate must lie in (0, 1], got {self.drift_rate}")
        if not 0.5 < self.gain_decay <= 1.0:
            raise ValueError(f"gain_decay must lie in (0.5, 1], got {self.gain_decay}")
        if not self.drift_level > 0:
            raise ValueError(f"drift_level must be positive, got {self.drift_level}")
        if not self.restart_age >= 1.0:
            raise ValueError(f"restart_age must be at least 1, got {self.restart_age}")
        if self.common_test not in ("within", "across"):
            raise ValueError(f"common_test must be 'within' or 'across', got {self.common_test!r}")
        if self.lr <= 0:
            raise ValueError(f"threshold lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps}")
        if self.clip_grad_mult is not None and self.clip_grad_mult <= 0:
            raise ValueError(f"clip_grad_mult must be positive or None, got {self.clip_grad_mult}")
        if self.mask_start_epoch < self.update_start_epoch:
            raise ValueError(
                f"mask_start_epoch ({self.mask_start_epoch}) must not precede "
                f"update_start_epoch ({self.update_start_epoch})"
            )

    def rule(self) -> ThresholdRule:
        """A new instance of the configured update rule (``RULES``, filled by the rules'
        modules when the package is imported)."""
        return RULES[self.update_rule](self)


class ThresholdRule(ABC):
    """How one visit's batch statistics move an anchor's state row.

    ``statistics`` runs on each rank for its own anchors; the caller all-gathers the
    per-anchor values (O(global batch)) and every rank applies ``step`` to the same rows.
    """

    columns: ClassVar[tuple[str, ...]]
    settings: ClassVar[tuple[str, ...]]
    """The ``GloFNDConfig`` fields this rule reads (reported in the detector's config)."""
    point: ClassVar[int] = LAMBDA
    """The column at which a visit's statistics are taken (the threshold itself, or the
    iterate that a threshold averages)."""
    fill: ClassVar[tuple[float, ...]]
    valid: ClassVar[tuple[ValueRange, ...]]
    """Valid values of each column (checked when a stored state is loaded)."""
    num_statistics: ClassVar[int]
    frame: ClassVar[tuple[int, ...]] = ()
    """Columns in similarity units that move with the side's *common shift* (``update``):
    every anchor's, visited in this batch or not."""
    side_columns: ClassVar[tuple[str, ...]] = ()
    """Quantities kept once per side, not per sample (stored as ``<side>.<name>`` of shape
    (1,)); ``side_fill`` their values before any visit, or where a stored state lacks them."""
    side_fill: ClassVar[tuple[float, ...]] = ()

    @classmethod
    def side_start(cls, device: torch.device | str = "cpu") -> torch.Tensor:
        """(2, len(side_columns)) the per-side values before any visit (``side_fill``)."""
        return torch.tensor([list(cls.side_fill)] * len(SIDES), dtype=torch.float32, device=device)

    def __init__(self, config: GloFNDConfig) -> None:
        self.config = config

    @classmethod
    def bytes_per_sample(cls) -> int:
        """Per-sample state of both sides: one float32 per column."""
        return len(SIDES) * len(cls.columns) * 4

    def upgrade(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A stored state of an earlier version of this rule, completed to today's columns
        (the state as it is when nothing is missing)."""
        return state

    @abstractmethod
    def statistics(
        self, sim: torch.Tensor, negatives: torch.Tensor, lam: torch.Tensor
    ) -> torch.Tensor:
        """(2, b, num_statistics) float32 values of this visit for the (2, b) anchors."""

    @abstractmethod
    def step(self, rows: torch.Tensor, stats: torch.Tensor, epoch: float) -> torch.Tensor:
        """New (n, 2, len(columns)) rows from the old rows and (n, 2, num_statistics)
        statistics; a pure function of its inputs."""

    def update(
        self,
        rows: torch.Tensor,
        stats: torch.Tensor,
        epoch: float,
        sides: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``step``'s new rows, the (2,) shift of the ``frame`` columns of every other
        anchor that this batch shows (the embeddings moved together) or None, and the new
        (2, len(side_columns)) per-side values (``sides`` as they were, where the rule
        keeps none)."""
        return self.step(rows, stats, epoch), None, sides
