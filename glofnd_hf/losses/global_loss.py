"""The global contrastive loss of SogCLR / FastCLIP with false-negative handling.

For each anchor and side, ``g_i`` is the mean over the kept negatives j of
``exp((s_ij - s_ii) * logit_scale)``. A per-sample moving average ``u_i`` (keyed by dataset
index) of ``g_i`` estimates the global denominator; the gradient of ``log g`` is estimated by
``grad(g_i) / u_i``, so the surrogate is ``g_i / (u_i + eps)`` with ``u`` held fixed.

The loss follows the FastCLIP reference code (Wei et al., 2024, github.com/Optimization-AI/
fast_clip, ``FastCLIPLoss``; SogCLR there is the same loss without the temperature factor),
with which FastCLIP-v3's ``rho`` and gamma settings were chosen. With ``tau = 1 / logit_scale``
and ``F_side = mean_i g_i / u_i`` over a side's anchors:

* the value is what its training logs print: ``F_image + F_text`` (SogCLR), or
  ``tau.detach() * (F_image + F_text) + tau * (rho + (mean log u_image + mean log u_text) / 2)``
  (FastCLIP, also with a fixed temperature, where tau carries no gradient);
* the embeddings' gradients are those of ``tau * (F_image + F_text) / 2``, half the gradient
  of the value: the reference adds a local-anchors-against-gathered-candidates term and a
  gathered-anchors-against-local-candidates term, each of value ``F_image + F_text``, halves
  the sum, and gathers without gradient, so the first carries the anchors' (and positives')
  share of the gradient and the second the negatives' share. Differentiating the value as
  written, with the gathered embeddings carrying gradient, would double them;
* the learnable temperature's gradient is that of the value (``temperature_gradient=
  "fastclip"``): the surrogate of the two sides summed, the ``rho`` and ``log u`` terms
  averaged. ``"mean"`` averages all of them, which is the gradient of the objective
  ``tau * (mean log g + rho)``. The loss value and the embeddings' gradients are the same
  either way;
* the cosine gamma schedule is evaluated at the integer epoch and held through it
  (``GammaSchedule(granularity="epoch")``); ``"step"`` evaluates it at each step's fractional
  epoch.

Earlier versions logged half the surrogate's value (the two sides averaged,
``tau * (F_image + F_text) / 2``) and left ``tau * (rho + mean log u)`` out with a fixed
temperature; their gradients were the same as now.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from ..fnd import comm
from ..fnd.interface import SIDES, FalseNegativeDetector
from ..fnd.table import NON_NEGATIVE, StateSharding, check_state_tensor, make_table, segment_mean
from .base import BimodalContrastiveLoss, LossOutput, Masks, Strategy
from .registry import Citation, LossBuild, LossSettings, LossSpec, register

TemperatureScheme = Literal["learnable", "fixed"]
"""learnable: the temperature is trained (FastCLIP-v3, FastCLIP's "global_learnable");
fixed: it is not."""
TEMPERATURE_SCHEMES: tuple[str, ...] = ("learnable", "fixed")
TemperatureGradient = Literal["fastclip", "mean"]
"""How the two sides weigh in a learnable temperature's gradient. fastclip: the surrogate
terms summed over the sides, rho and log u averaged (FastCLIP's code); mean: all averaged."""
TEMPERATURE_GRADIENTS: tuple[str, ...] = ("fastclip", "mean")
GammaGranularity = Literal["epoch", "step"]
"""When the gamma schedule moves. epoch: evaluated at the integer epoch, held through it
(FastCLIP's code); step: evaluated at each step's fractional epoch."""
GAMMA_GRANULARITIES: tuple[str, ...] = ("epoch", "step")
U_BYTES_PER_SAMPLE = len(SIDES) * 4  # u of both sides, float32


def temperature_scheme(name: str) -> TemperatureScheme:
    """``name`` checked, FastCLIP's older name ``global_learnable`` read as ``learnable``."""
    if name == "global_learnable":
        warnings.warn(
            "temperature scheme 'global_learnable' is now called 'learnable'",
            FutureWarning,
            stacklevel=3,
        )
        return "learnable"
    if name not in TEMPERATURE_SCHEMES:
        raise ValueError(f"temperature must be one of {TEMPERATURE_SCHEMES}, got {name!r}")
    return name  # type: ignore[return-value]


@dataclass
class GammaSchedule:
    """Weight of the newest estimate in the moving average ``u``.

    ``constant``: always ``final``. ``cosine``: from 1.0 at epoch 0 down to ``final`` at
    ``decay_epochs`` on a half cosine, then ``final``. ``granularity``: ``epoch`` evaluates the
    cosine at the integer epoch ``floor(epoch)`` and holds it through the epoch, as FastCLIP's
    code (which sets gamma once at each epoch start); ``step`` evaluates it at the fractional
    epoch of each step, so gamma is lower within an epoch (by up to about
    ``(1 - final) * pi / (2 * decay_epochs)``, 0.07 for the defaults).
    """

    final: float = 0.2
    kind: Literal["constant", "cosine"] = "cosine"
    decay_epochs: float = 18.0
    granularity: GammaGranularity = "epoch"

    def __post_init__(self) -> None:
        if not 0.0 < self.final <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {self.final}")
        if self.kind not in ("constant", "cosine"):
            raise ValueError(f"gamma schedule must be 'constant' or 'cosine', got {self.kind!r}")
        if self.kind == "cosine" and self.decay_epochs <= 0:
            raise ValueError(f"gamma decay_epochs must be positive, got {self.decay_epochs}")
        if self.granularity not in GAMMA_GRANULARITIES:
            raise ValueError(
                f"gamma granularity must be one of {GAMMA_GRANULARITIES}, got {self.granularity!r}"
            )

    def __call__(self, epoch: float) -> float:
        if self.granularity == "epoch":
            epoch = math.floor(epoch)
        if self.kind == "constant" or epoch >= self.decay_epochs:
            return self.final
        progress = max(epoch, 0.0) / self.decay_epochs
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_u_state(key: str, value: torch.Tensor, num_samples: int) -> None:
    """A stored u: (N,) float32, finite and >= 0 (0: never visited; a moving average of
    positive g otherwise)."""
    check_state_tensor(key, value, (num_samples,), valid=NON_NEGATIVE)


class GlobalContrastiveLoss(BimodalContrastiveLoss):
    """SogCLR / FastCLIP global contrastive loss for both sides.

    ``multiply_tau`` (FastCLIP) scales the surrogate by the temperature ``tau = 1 /
    logit_scale`` so its gradients are comparable to InfoNCE's, and adds
    ``tau * (rho + mean log u)``. ``temperature``: ``fixed`` uses the given scale without
    gradient (the added term then counts in the value only, as in FastCLIP's code);
    ``learnable`` (FastCLIP-v3's "global_learnable") trains it, and the added term's
    gradient with the surrogate's estimates the gradient of ``tau * log g + rho * tau`` with
    respect to the temperature. The value sums the two sides' surrogates and the embeddings'
    gradients average them, as the reference's (module docstring).

    ``temperature_gradient`` (learnable only) weighs the two sides in that gradient. With
    ``S`` the surrogate's share (``tau.detach() * mean g / u`` differentiated through the
    logit scale inside g) and ``C`` the rest (``tau * (rho + mean log u)``): ``"mean"`` gives
    ``S + C``, where the surrogate of each side is averaged like everything else, the
    gradient of the objective above; ``"fastclip"`` (the default) gives ``2 S + C``, the
    surrogate terms of the two sides summed and the ``rho`` and ``log u`` terms averaged, as
    FastCLIP's code computes it (with which its ``rho`` was chosen). The loss value and the
    embeddings' gradients do not depend on it.
    """

    keeps_anchor_state = True

    def __init__(
        self,
        num_samples: int,
        detector: FalseNegativeDetector | None = None,
        strategy: Strategy = "eliminate",
        gamma: GammaSchedule | None = None,
        temperature: TemperatureScheme = "learnable",
        rho: float = 6.5,
        multiply_tau: bool = True,
        eps: float = 1e-14,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        check_inputs: bool = True,
        temperature_gradient: TemperatureGradient = "fastclip",
        sharding: StateSharding = "replicated",
    ) -> None:
        super().__init__(detector, strategy, check_inputs)
        temperature = temperature_scheme(temperature)
        if temperature == "learnable" and not multiply_tau:
            raise ValueError("a learnable temperature needs multiply_tau=True (FastCLIP-v3)")
        if temperature_gradient not in TEMPERATURE_GRADIENTS:
            raise ValueError(
                f"temperature_gradient must be one of {TEMPERATURE_GRADIENTS}, "
                f"got {temperature_gradient!r}"
            )
        detector_n = self.detector.num_samples
        if detector_n is not None and detector_n != num_samples:
            raise ValueError(
                f"loss and detector disagree on num_samples: {num_samples} vs {detector_n}"
            )
        self.gamma = gamma or GammaSchedule()
        self.temperature: TemperatureScheme = temperature
        self.rho = float(rho)
        self.multiply_tau = multiply_tau
        self.temperature_gradient: TemperatureGradient = temperature_gradient
        self.eps = eps
        # u of both sides; 0 marks "never visited" (g > 0 always once visited). Sharded:
        # each process holds the rows it owns (fnd.table.ShardedPerSampleTable).
        self.sharding: StateSharding = sharding
        self.u = make_table(num_samples, (len(SIDES),), 0.0, device, pin_memory, sharding)

    @property
    def num_samples(self) -> int:
        return self.u.num_samples

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every sample's u and the detector's state; sharded: gathered from every process
        (an O(N) all-gather, a collective: every process calls it)."""
        state = super().state_dict()
        u = self.u.data if self.sharding == "replicated" else self.u.full()
        for s, side in enumerate(SIDES):
            state[f"{side}.u"] = u[:, s].contiguous().cpu()
        return state

    def _tables_read_per_step(self) -> list:
        return [*super()._tables_read_per_step(), self.u]

    def shard_tables(self) -> dict:
        return {**super().shard_tables(), "u": self.u}

    def check_shard_rows(self, name: str, rows: torch.Tensor) -> None:
        if name != "u":
            return super().check_shard_rows(name, rows)
        for s, side in enumerate(SIDES):
            check_u_state(f"{side}.u", rows[:, s], rows.shape[0])

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {f"{side}.u" for side in SIDES}
        missing = own - state.keys()
        if missing:
            raise ValueError(f"global loss state misses {sorted(missing)}")
        for side in SIDES:
            check_u_state(f"{side}.u", state[f"{side}.u"], self.num_samples)
        super().load_state_dict({k: v for k, v in state.items() if k not in own})
        if self.sharding == "replicated":
            for s, side in enumerate(SIDES):  # after the detector's state passed its checks
                self.u.data[:, s].copy_(state[f"{side}.u"])
        else:  # every sample's u: each process keeps its own rows
            self.u.load_full(torch.stack([state[f"{side}.u"] for side in SIDES], -1))

    def to(self, device: torch.device | str) -> GlobalContrastiveLoss:
        super().to(device)
        self.u.to(device)
        return self

    def config_dict(self) -> dict:
        return {
            **super().config_dict(),
            "num_samples": self.num_samples,
            "gamma": self.gamma.final,
            "gamma_schedule": self.gamma.kind,
            "gamma_decay_epochs": self.gamma.decay_epochs,
            "gamma_granularity": self.gamma.granularity,
            "temperature": self.temperature,
            "rho": self.rho,
            "multiply_tau": self.multiply_tau,
            "temperature_gradient": self.temperature_gradient,
        }

    def _loss(
        self,
        sim: torch.Tensor,
        logit_scale: torch.Tensor,
        masks: Masks,
        epoch: float,
        anchor_state: torch.Tensor | None = None,
    ) -> LossOutput:
        assert masks.candidate_index is not None  # indices are required (checked on entry)
        if self.temperature == "fixed":
            logit_scale = logit_scale.detach()
        own_sim = sim[:, torch.arange(sim.shape[1], device=sim.device), masks.positive_column]
        g = self._g(sim, own_sim, self._surrogate_scale(logit_scale), masks)  # (2, b)
        u = anchor_state  # (2, b), no gradient
        if u is None:
            u = self._update_anchor_state(g.detach(), masks.candidate_index, epoch)
        surrogate = g / (u + self.eps)
        if self.strategy == "attract" and masks.false_negatives is not None:
            # Extra positives: the linear part of -log softmax for each of them, averaged.
            positives = masks.positives(self.strategy)
            pos_sim = torch.where(positives, sim, torch.zeros_like(sim)).sum(-1)
            pos_sim = pos_sim / positives.sum(-1)
            surrogate = surrogate + (own_sim - pos_sim) * logit_scale.detach()

        stats = {
            "gamma": torch.full((), self.gamma(epoch), device=sim.device),
            "u_mean_image": u[0].mean(),
            "u_mean_text": u[1].mean(),
        }
        loss = self._sides_summed(surrogate)
        if not self.multiply_tau:
            return LossOutput(loss, stats)
        # With a fixed temperature tau is detached (above): the rho and log u terms add to the
        # value only, as in the reference.
        tau = 1.0 / logit_scale
        loss = tau.detach() * loss + tau * (self.rho + torch.log(u + self.eps).mean())
        return LossOutput(loss, stats)

    @staticmethod
    def _sides_summed(surrogate: torch.Tensor) -> torch.Tensor:
        """The (2, b) surrogate as the reference counts it: the value is the sum over the two
        sides of each side's mean over the anchors (its logged loss), the gradient that of the
        mean over both sides (its embeddings' gradients: each of its two terms carries half of
        them). The logit scale's share is made the gradient of the value, where the weighting
        asks for it, by ``_surrogate_scale``."""
        mean = surrogate.mean()
        return mean + (surrogate.mean(-1).sum() - mean).detach()

    def _g(
        self, sim: torch.Tensor, own_sim: torch.Tensor, logit_scale: torch.Tensor, masks: Masks
    ) -> torch.Tensor:
        """(2, b) mean over each anchor's kept negatives of exp((s_ij - s_ii) * scale)."""
        diff = (sim - own_sim.unsqueeze(-1)) * logit_scale
        kept = masks.kept_negatives(self.strategy)
        n_kept = kept.sum(-1).clamp(min=1)
        return torch.where(kept, torch.exp(diff), torch.zeros_like(diff)).sum(-1) / n_kept

    def _anchor_values(
        self, sim: torch.Tensor, logit_scale: torch.Tensor, masks: Masks
    ) -> torch.Tensor:
        """g of each anchor: what u averages."""
        own_sim = sim[:, torch.arange(sim.shape[1], device=sim.device), masks.positive_column]
        return self._g(sim, own_sim, logit_scale.detach(), masks).detach()

    def _update_anchor_state(
        self, values: torch.Tensor, candidate_index: torch.Tensor, epoch: float
    ) -> torch.Tensor:
        return self._update_u(candidate_index, values, epoch)

    def _surrogate_scale(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """The logit scale as the surrogate sees it: its value, with the gradient that flows back
        through it multiplied by the number of sides for ``temperature_gradient="fastclip"``.

        The surrogate's gradient is that of the mean over the two sides (``_sides_summed``),
        so this turns its share of the temperature's gradient into that of the sum over the
        sides, the value's (FastCLIP's code), and leaves the value and every other gradient
        as they are."""
        if self.temperature_gradient == "mean" or not logit_scale.requires_grad:
            return logit_scale
        weight = float(len(SIDES))
        return logit_scale + (weight - 1.0) * (logit_scale - logit_scale.detach())

    def _objective(self, sim: torch.Tensor, logit_scale: torch.Tensor, masks: Masks) -> LossOutput:
        """The objective the surrogate minimises, estimated from this batch alone (its own g
        in place of u): ``mean log g``, times tau for FastCLIP, plus ``tau * rho`` with a
        learnable temperature. u is neither read nor written."""
        own_sim = sim[:, torch.arange(sim.shape[1], device=sim.device), masks.positive_column]
        g = self._g(sim, own_sim, logit_scale, masks)
        value = torch.log(g + self.eps).mean()
        if not self.multiply_tau:
            return LossOutput(value)
        tau = 1.0 / logit_scale
        value = tau * value
        if self.temperature == "learnable":
            value = value + tau * self.rho
        return LossOutput(value)

    @torch.no_grad()
    def _update_u(self, all_index: torch.Tensor, g: torch.Tensor, epoch: float) -> torch.Tensor:
        """Moving-average step for the anchors of the global batch (``all_index``, rank after
        rank); returns the local anchors' u.

        Like the thresholds, every rank applies the same update from the gathered g, so u
        stays identical on every rank. A first visit (u == 0) starts from g itself.
        """
        gamma = self.gamma(epoch)
        b = g.shape[1]
        all_g = segment_mean(all_index, comm.all_gather_no_grad(g.t().contiguous()))  # (B, 2)
        old = self.u.gather(all_index, g.device)
        new = torch.where(old > 0, (1.0 - gamma) * old + gamma * all_g, all_g)
        self.u.scatter(all_index, new)
        start = comm.rank() * b
        return new[start : start + b].t()


FASTCLIP = Citation(
    what="FastCLIP (the global contrastive loss and temperature scheme)",
    bibtex="""@article{wei2024fastclip,
  title         = {FastCLIP: A Suite of Optimization Techniques to Accelerate CLIP Training with Limited Resources},
  author        = {Wei, Xiyuan and Ye, Fanjiang and Yonay, Ori and Chen, Xingyu and Sun, Baixi and Tao, Dingwen and Yang, Tianbao},
  journal       = {arXiv preprint arXiv:2407.01445},
  year          = {2024},
  eprint        = {2407.01445},
  archivePrefix = {arXiv}
}""",
)
SOGCLR = Citation(
    what="SogCLR (the global contrastive loss with a fixed temperature)",
    bibtex="""@inproceedings{yuan2022sogclr,
  title     = {Provable Stochastic Optimization for Global Contrastive Learning: Small Batch Does Not Harm Performance},
  author    = {Yuan, Zhuoning and Wu, Yuexin and Qiu, Zi-Hao and Du, Xianzhi and Zhang, Lijun and Zhou, Denny and Yang, Tianbao},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning (ICML)},
  year      = {2022}
}""",
)


def _global_loss(fastclip: bool):
    def build(
        detector: FalseNegativeDetector, settings: LossSettings, where: LossBuild
    ) -> GlobalContrastiveLoss:
        return GlobalContrastiveLoss(
            where.num_samples,
            detector,
            settings.fn_strategy,
            gamma=settings.gamma_schedule_obj(),
            temperature=settings.temperature_scheme if fastclip else "fixed",
            rho=settings.rho,
            multiply_tau=fastclip,
            temperature_gradient=settings.temperature_gradient,
            device=where.device,
            pin_memory=where.pin_memory,
            check_inputs=settings.check_inputs,
            sharding=where.sharding,
        )

    return build


register(
    LossSpec(
        name="sogclr",
        description="global contrastive loss (fixed temperature)",
        objective="SogCLR global contrastive loss (moving-average estimate of each sample's "
        "negative term over the whole data set, fixed temperature)",
        factory=_global_loss(fastclip=False),
        citations=(FASTCLIP, SOGCLR),
        state_bytes_per_sample=U_BYTES_PER_SAMPLE,
        fixed_temperature=True,
    )
)
register(
    LossSpec(
        name="fastclip",
        description="global contrastive loss times the temperature (FastCLIP)",
        objective="FastCLIP global contrastive loss (moving-average estimate of each "
        "sample's negative term, multiplied by the temperature)",
        factory=_global_loss(fastclip=True),
        citations=(FASTCLIP,),
        state_bytes_per_sample=U_BYTES_PER_SAMPLE,
    )
)
