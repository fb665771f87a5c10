"""The wall time of one IFND clustering round at growing data set sizes.

IFND re-clusters the whole feature bank each round (O(N) per round); the study's data sets
are too small to show what that costs at scale, so the results carry this measurement on
synthetic clustered features beside the training runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glofnd_hf.fnd.ifnd_config import IFNDConfig
from glofnd_hf.fnd.interface import DetectionBatch


def ifnd_round_scaling(sizes: list[int], dim: int = 64, k: int = 100) -> list[dict[str, float]]:
    from glofnd_hf.fnd.ifnd import IFNDDetector

    rows = []
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        centres = F.normalize(torch.randn(k, dim, generator=gen), dim=-1)
        x = centres[torch.randint(k, (n,), generator=gen)] + 0.3 * torch.randn(
            n, dim, generator=gen
        )
        det = IFNDDetector(
            n,
            IFNDConfig(
                num_clusters=(k,), start_epoch=0.0, accept_warmup_epochs=0.0, bank_warmup_epochs=0.0
            ),
        )
        det.observe(torch.arange(n), x, x)
        index = torch.arange(8)
        det.detect(
            torch.zeros(2, 8, 8),
            DetectionBatch(
                index,
                index,
                torch.ones(8, 8, dtype=torch.bool) & ~torch.eye(8, dtype=torch.bool),
                0.0,
            ),
        )
        rows.append(
            {
                "num_samples": n,
                "dim": dim,
                "k": k,
                "seconds": round(det.round_seconds, 3),
                "algorithm": "MiniBatchKMeans" if n > det.config.minibatch_threshold else "KMeans",
            }
        )
    return rows
