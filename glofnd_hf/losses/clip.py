"""CLIP InfoNCE with false-negative handling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import BimodalContrastiveLoss, LossOutput, Masks
from .registry import LossSpec, register


class ClipLoss(BimodalContrastiveLoss):
    """Symmetric CLIP InfoNCE: local anchors against the gathered global batch.

    Per anchor i and side: ``-mean_{p in P_i} [l_ip - logsumexp_{k in D_i} l_ik]`` with
    ``l = logit_scale * sim``. ``D_i`` holds the positives and the kept negatives; with
    ``eliminate`` P_i is the anchor's own pair and detected false negatives leave D_i; with
    ``attract`` they join P_i (the supervised-contrastive form). The loss is the mean over
    anchors and both sides, which without a detector equals ``transformers``' ``clip_loss``.
    """

    def _loss(
        self,
        sim: torch.Tensor,
        logit_scale: torch.Tensor,
        masks: Masks,
        epoch: float,
    ) -> LossOutput:
        logits = logit_scale * sim
        if self.strategy == "eliminate" or masks.false_negatives is None:
            # One positive per anchor: cross-entropy over the kept columns.
            dropped = ~(masks.own | masks.kept_negatives(self.strategy))
            masked = logits.masked_fill(dropped, float("-inf"))
            target = masks.positive_column.repeat(len(sim))
            per_anchor = F.cross_entropy(
                masked.reshape(-1, masked.shape[-1]), target, reduction="none"
            ).view(len(sim), -1)
        else:
            positives = masks.positives(self.strategy)
            in_denominator = positives | masks.kept_negatives(self.strategy)
            lse = torch.logsumexp(logits.masked_fill(~in_denominator, float("-inf")), dim=-1)
            pos_sum = torch.where(positives, logits, torch.zeros_like(logits)).sum(-1)
            per_anchor = lse - pos_sum / positives.sum(-1)  # (2, b)
        return LossOutput(
            per_anchor.mean(),
            {
                "loss_image": per_anchor[0].mean().detach(),
                "loss_text": per_anchor[1].mean().detach(),
            },
        )


register(
    LossSpec(
        name="clip",
        description="CLIP InfoNCE",
        objective="CLIP InfoNCE (symmetric image-to-text and text-to-image cross-entropy "
        "over the global batch)",
        factory=lambda detector, settings, where: ClipLoss(
            detector, settings.fn_strategy, check_inputs=settings.check_inputs
        ),
    )
)
