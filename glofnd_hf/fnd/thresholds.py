"""GloFND's per-sample thresholds: the state, its update rule and its persistence.

For every sample and each anchor side (image anchors, text anchors) GloFND keeps a threshold
``lambda`` and the two moments of an Adam optimiser. One update is a stochastic gradient step
on the pinball loss, whose minimiser is the (1 - alpha) quantile of the anchor's similarity to
the whole data set:

    g      = alpha - mean_{j in negatives} 1[s_ij > lambda]
    m, v   = Adam moments of g;  lambda <- clamp(lambda - lr * mhat / (sqrt(vhat) + eps), -1, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .table import PerSampleTable

SIDES = ("image", "text")
COLUMNS = ("lambda", "exp_avg", "exp_avg_sq", "visits")
LAMBDA, EXP_AVG, EXP_AVG_SQ, VISITS = range(len(COLUMNS))


@dataclass
class GloFNDConfig:
    """Hyper-parameters of the threshold update (defaults of the GloFND reference)."""

    alpha: float = 1e-3
    """Fraction of the data set taken as false negatives of each anchor."""
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    clip_grad_mult: float | None = None
    """Clip the threshold gradient to +-clip_grad_mult * alpha (None: no clipping)."""
    init_quantile: bool = False
    """On an anchor's first visit set lambda to its in-batch (1 - alpha) quantile instead of
    taking an Adam step; removes the slow descent from 1.0 (sensible when fine-tuning)."""
    update_start_epoch: float = 0.0
    mask_start_epoch: float = 0.0
    bias_correction: Literal["step", "epoch"] = "step"
    """"step": Adam bias correction with the anchor's own step count (default, the
    well-founded choice); "epoch": t = epoch + 1 as in the reference implementation."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha}")
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
        if self.bias_correction not in ("step", "epoch"):
            raise ValueError(f"bias_correction must be 'step' or 'epoch', got {self.bias_correction!r}")


class ThresholdState:
    """Thresholds, Adam moments and visit counts of both sides for ``num_samples`` samples.

    Stored as one (N, 2, 4) float32 table (side x [lambda, m, v, visits]) so that a step
    reads and writes every quantity of the touched anchors with a single gather and a single
    scatter. 32 bytes per sample; host memory is fine for large N.
    """

    def __init__(
        self, num_samples: int, device: torch.device | str = "cpu", pin_memory: bool = False
    ) -> None:
        self.table = PerSampleTable(
            num_samples, (len(SIDES), len(COLUMNS)), fill=[1.0, 0.0, 0.0, 0.0],
            device=device, pin_memory=pin_memory,
        )

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    @property
    def device(self) -> torch.device:
        return self.table.device

    def to(self, device: torch.device | str) -> ThresholdState:
        self.table.to(device)
        return self

    def lambdas(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Thresholds of ``index`` as a (len(index), 2) tensor [image side, text side]."""
        return self.table.gather(index, device)[..., LAMBDA]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors, one per side and quantity, storable with safetensors."""
        return {
            f"{side}.{column}": self.table.data[:, s, c].contiguous().cpu()
            for s, side in enumerate(SIDES)
            for c, column in enumerate(COLUMNS)
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{side}.{column}" for side in SIDES for column in COLUMNS}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise ValueError(
                f"threshold state keys do not match: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        for key, value in state.items():
            if tuple(value.shape) != (self.num_samples,):
                raise ValueError(
                    f"threshold state {key!r} has shape {tuple(value.shape)}, expected "
                    f"({self.num_samples},): was it saved for a data set of another size?"
                )
        for s, side in enumerate(SIDES):
            for c, column in enumerate(COLUMNS):
                self.table.data[:, s, c].copy_(state[f"{side}.{column}"])

    def apply_update(
        self,
        index: torch.Tensor,
        grad: torch.Tensor,
        quantile: torch.Tensor | None,
        config: GloFNDConfig,
        epoch: float,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One threshold step for the anchors ``index``; returns their new (n, 2, 4) rows.
        ``rows``: their current rows when the caller has already read them.

        ``grad``: (n, 2) pinball-loss gradients (equal for repeated indices, see
        ``segment_mean``); ``quantile``: (n, 2) in-batch quantiles used on a first visit when
        ``config.init_quantile`` is set.
        """
        if rows is None:
            rows = self.table.gather(index, grad.device)
        rows = threshold_step(rows, grad, quantile, config, epoch)
        self.table.scatter(index, rows)
        return rows


def threshold_step(
    rows: torch.Tensor,
    grad: torch.Tensor,
    quantile: torch.Tensor | None,
    config: GloFNDConfig,
    epoch: float,
) -> torch.Tensor:
    """New (n, 2, 4) state rows after one update; a pure function of its inputs."""
    lam, m, v, visits = rows.unbind(-1)
    beta1, beta2 = config.betas
    g = grad.to(torch.float32)
    if config.clip_grad_mult is not None:
        bound = config.clip_grad_mult * config.alpha
        g = g.clamp(-bound, bound)
    new_m = beta1 * m + (1 - beta1) * g
    new_v = beta2 * v + (1 - beta2) * g * g
    new_visits = visits + 1
    if config.bias_correction == "step":
        # Adam steps taken so far: visits, less the initialising visit when there is one.
        t = (new_visits - float(config.init_quantile)).clamp(min=1.0)
        bc1 = 1 - torch.pow(beta1, t)
        bc2 = 1 - torch.pow(beta2, t)
    else:
        t_epoch = math.floor(epoch) + 1
        bc1 = torch.full_like(lam, 1 - beta1**t_epoch)
        bc2 = torch.full_like(lam, 1 - beta2**t_epoch)
    step = config.lr * (new_m / bc1) / (torch.sqrt(new_v / bc2) + config.eps)
    new_lam = (lam - step).clamp(-1.0, 1.0)
    if config.init_quantile and quantile is not None:
        first = visits == 0
        new_lam = torch.where(first, quantile.to(torch.float32).clamp(-1.0, 1.0), new_lam)
        new_m = torch.where(first, m, new_m)
        new_v = torch.where(first, v, new_v)
    return torch.stack([new_lam, new_m, new_v, new_visits], dim=-1)
