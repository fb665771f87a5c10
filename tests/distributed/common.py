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


def fixed_global_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    image = torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    text = image + 0.5 * torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    index = torch.randperm(N, generator=gen)[:GLOBAL_BATCH]
    index[5] = index[12]  # a duplicate across the two ranks' halves
    labels = index % 5
    return image, text, index, labels


def build_loss(kind):
    # "_iq": the Adam rule starting at the in-batch quantile; otherwise the default tail rule.
    adam = kind.endswith("_iq")
    config = GloFNDConfig(
        alpha=0.1, lr=0.05, init_quantile=adam, update_rule="adam" if adam else "tail"
    )
    detector = build_detector("glofnd", num_samples=N, config=config)
    if kind.startswith("clip"):
        return ClipLoss(detector)
    return GlobalContrastiveLoss(
        N, detector, gamma=GammaSchedule(0.5, "constant"), temperature="learnable"
    )
