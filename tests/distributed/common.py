"""Shared pieces of the distributed tests (imported by the workers and the tests)."""

import torch

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import ClipLoss, GammaSchedule, GlobalContrastiveLoss

N = 64
GLOBAL_BATCH = 16
DIM = 12


class Projection(torch.nn.Module):
    """A tiny dual encoder: two linear maps and a learnable log temperature."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(DIM, 8)
        self.text = torch.nn.Linear(DIM, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, image, text):
        return self.image(image), self.text(text), self.logit_scale.exp()


def projection():
    torch.manual_seed(0)
    return Projection()


def stats_as_floats(stats):
    """A loss's statistics as plain floats (what the trainer logs, before rounding)."""
    return {k: float(v) for k, v in stats.items()}


def fixed_global_batch(step, kind=""):
    gen = torch.Generator().manual_seed(100 + step)
    image = torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    text = image + 0.5 * torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    index = torch.randperm(N, generator=gen)[:GLOBAL_BATCH]
    index[5] = index[12]  # a duplicate across the two ranks' halves
    labels = index % 5
    if kind.endswith("_oracle"):
        # One label for all: every negative is a false negative, every anchor falls back.
        labels = torch.zeros_like(labels)
    return image, text, index, labels


def build_loss(kind):
    # "_iq": the Adam rule starting at the in-batch quantile; otherwise the default tail rule.
    # "_bq": the in-batch quantile baseline detector instead of GloFND.
    adam = kind.endswith("_iq")
    config = GloFNDConfig(
        alpha=0.1, lr=0.05, init_quantile=adam, update_rule="adam" if adam else "tail"
    )
    # "_oracle": the label oracle (with one label for the whole batch).
    name = {"_bq": "batch_quantile", "_oracle": "oracle"}.get(kind[kind.rfind("_") :], "glofnd")
    detector = build_detector(name, num_samples=N, config=config)
    if kind.startswith("clip"):
        return ClipLoss(detector)
    return GlobalContrastiveLoss(
        N, detector, gamma=GammaSchedule(0.5, "constant"), temperature="learnable"
    )
