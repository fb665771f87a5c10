"""Adam on the pinball gradient: the GloFND reference's rule (``reference``, bias
correction with t = epoch + 1) and ``adam`` (each sample's own step count)."""

from __future__ import annotations

import math

import torch

from ..quantiles import masked_quantile
from ..table import COUNT, FINITE, NON_NEGATIVE
from .batch import pinball_gradient
from .config import RULES, THRESHOLD_RANGE, GloFNDConfig, ThresholdRule


class AdamRule(ThresholdRule):
    """Adam on the pinball gradient (the GloFND reference's rule)."""

    columns = ("lambda", "exp_avg", "exp_avg_sq", "visits")
    settings = ("lr", "betas", "eps", "clip_grad_mult", "init_quantile")
    fill = (1.0, 0.0, 0.0, 0.0)
    valid = (THRESHOLD_RANGE, FINITE, NON_NEGATIVE, COUNT)

    def __init__(self, config: GloFNDConfig) -> None:
        super().__init__(config)
        # The pinball gradient, and the in-batch quantile where a first visit starts there.
        self.num_statistics = 2 if config.init_quantile else 1

    def statistics(self, sim, negatives, lam):
        cfg = self.config
        count = negatives.sum(-1)
        grad = pinball_gradient(sim, negatives, lam, cfg.alpha, count=count)
        # NaN: no gradient, for an anchor without negatives (``step`` leaves its row).
        values = [torch.where(count > 0, grad, math.nan)]
        if cfg.init_quantile:
            q = masked_quantile(sim, negatives, 1.0 - cfg.alpha)
            values.append(torch.where(torch.isnan(q), lam, q))
        return torch.stack(values, dim=-1).to(torch.float32)

    def step(self, rows, stats, epoch):
        quantile = stats[..., 1] if self.config.init_quantile else None
        grad = stats[..., 0]
        informed = ~torch.isnan(grad)
        new = adam_step(rows, torch.where(informed, grad, 0.0), quantile, self.config, epoch)
        # An anchor without negatives (a batch of one) has no gradient: its row, moments and
        # step count included, stays as it was instead of coasting on its momentum.
        return torch.where(informed.unsqueeze(-1), new, rows)


def adam_step(
    rows: torch.Tensor,
    grad: torch.Tensor,
    quantile: torch.Tensor | None,
    config: GloFNDConfig,
    epoch: float,
) -> torch.Tensor:
    """New (n, 2, 4) Adam rows [lambda, m, v, visits] after one step on the (n, 2)
    gradients; ``quantile`` is used on a first visit when ``config.init_quantile`` is set."""
    lam, m, v, visits = rows.unbind(-1)
    beta1, beta2 = config.betas
    g = grad.to(torch.float32)
    if config.clip_grad_mult is not None:
        bound = config.clip_grad_mult * config.alpha
        g = g.clamp(-bound, bound)
    new_m = beta1 * m + (1 - beta1) * g
    new_v = beta2 * v + (1 - beta2) * g * g
    new_visits = visits + 1
    if config.update_rule == "reference":
        t_epoch = math.floor(epoch) + 1
        bc1 = torch.full_like(lam, 1 - beta1**t_epoch)
        bc2 = torch.full_like(lam, 1 - beta2**t_epoch)
    else:
        # Adam steps taken so far: visits, less the initialising visit when there is one.
        t = (new_visits - float(config.init_quantile)).clamp(min=1.0)
        bc1 = 1 - torch.pow(beta1, t)
        bc2 = 1 - torch.pow(beta2, t)
    step = config.lr * (new_m / bc1) / (torch.sqrt(new_v / bc2) + config.eps)
    new_lam = (lam - step).clamp(-1.0, 1.0)
    if config.init_quantile and quantile is not None:
        first = visits == 0
        new_lam = torch.where(first, quantile.to(torch.float32).clamp(-1.0, 1.0), new_lam)
        new_m = torch.where(first, m, new_m)
        new_v = torch.where(first, v, new_v)
    return torch.stack([new_lam, new_m, new_v, new_visits], dim=-1)


RULES["adam"] = AdamRule
RULES["reference"] = AdamRule
