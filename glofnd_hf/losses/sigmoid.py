"""The SigLIP sigmoid loss with false-negative handling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import BimodalContrastiveLoss, LossOutput, Masks
from .registry import Citation, LossSpec, register


class SigmoidLoss(BimodalContrastiveLoss):
    """SigLIP's pairwise sigmoid loss: every (image, text) pair of the global batch is a binary
    problem with logit ``z_ij = logit_scale * s_ij + logit_bias`` and label +1 on the pair
    itself, -1 elsewhere; the loss is ``sum_ij -log sigmoid(y_ij z_ij)`` over the global batch
    divided by its number of images (transformers' and open_clip's normalisation).

    How false negatives map onto pairs: a pair's term is split in half between its two
    anchors, the image anchor i (side 0, row i against all texts) and the text anchor j
    (side 1, row j against all images). Each anchor's detections act on its own half, as in
    the CLIP loss, where each side's detections act on its own softmax:

    * ``eliminate``: a detected false negative's half leaves the sum;
    * ``attract``: its half gets label +1 (a positive pair).

    So a pair both anchors flag is dropped (or made positive) entirely, and one flagged by one
    side only keeps the other half. This needs no exchange of masks between processes: each
    process sums its local anchors' rows against the gathered candidates. Without detections
    the two halves add up to the plain SigLIP loss. Candidates with the anchor's own dataset
    index (duplicates) are left out, as in the CLIP loss. Normalisation is by the number of
    anchors, never by the number of kept pairs: a dropped pair removes its term and nothing
    else. Under data parallelism each process divides by its local anchors; DDP's mean over
    processes then gives the one-process value.
    """

    uses_logit_bias = True

    def _loss(
        self,
        sim: torch.Tensor,
        logit_scale: torch.Tensor,
        masks: Masks,
        epoch: float,
        logit_bias: torch.Tensor | None = None,
    ) -> LossOutput:
        if logit_bias is None:
            raise ValueError("SigmoidLoss needs logit_bias")
        logits = logit_scale * sim + logit_bias  # (2, b, B)
        positives = masks.positives(self.strategy)
        in_sum = positives | masks.kept_negatives(self.strategy)
        signs = positives.to(logits.dtype) * 2 - 1  # +1 positive, -1 negative
        per_pair = -F.logsigmoid(signs * logits)
        per_anchor = torch.where(in_sum, per_pair, torch.zeros_like(per_pair)).sum(-1)  # (2, b)
        return LossOutput(
            per_anchor.mean(),
            {
                "loss_image": per_anchor[0].mean().detach(),
                "loss_text": per_anchor[1].mean().detach(),
            },
        )


SIGLIP = Citation(
    what="SigLIP (the sigmoid loss)",
    bibtex="""@inproceedings{zhai2023siglip,
  title         = {Sigmoid Loss for Language Image Pre-Training},
  author        = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle     = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year          = {2023},
  eprint        = {2303.15343},
  archivePrefix = {arXiv}
}""",
)

register(
    LossSpec(
        name="sigmoid",
        description="SigLIP's pairwise sigmoid loss with the model's learnable logit bias "
        "(SigLIP models only)",
        objective="SigLIP sigmoid loss (every image-text pair of the global batch a binary "
        "problem, with a learnable temperature and logit bias)",
        factory=lambda detector, settings, where: SigmoidLoss(
            detector, settings.fn_strategy, check_inputs=settings.check_inputs
        ),
        citations=(SIGLIP,),
        uses_logit_bias=True,
    )
)
