"""Shared pieces of the distributed tests (imported by the workers and the tests)."""

import torch

from glofnd_hf.fnd import GloFNDConfig, build_detector
from glofnd_hf.losses import ClipLoss, GammaSchedule, GlobalContrastiveLoss, SigmoidLoss

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


class SigmoidProjection(Projection):
    """The projection with SigLIP's learnable logit bias (for the sigmoid loss)."""

    def __init__(self):
        super().__init__()
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0))

    def forward(self, image, text):
        return (*super().forward(image, text), self.logit_bias)


def shut_down_process_group() -> None:
    """Leave the group together: gloo aborts a process (SIGABRT, "terminate called without an
    active exception") when one rank tears its pairs down while the other still uses them."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def projection(kind=""):
    torch.manual_seed(0)
    return SigmoidProjection() if kind.startswith("sigmoid") else Projection()


def apply_loss(loss_fn, outputs, index, epoch, labels):
    """The loss on the projection's outputs: embeddings, scale (and a logit bias)."""
    image, text, scale, *bias = outputs
    return loss_fn(
        image, text, scale, index, epoch=epoch, labels=labels, logit_bias=(bias or [None])[0]
    )


def cached_step(model, loss_fn, image, text, index, labels, step, chunk):
    """The cached loss over this rank's pairs in chunks of ``chunk`` (``model`` under DDP:
    only the last chunk's backward reduces the gradients)."""
    from glofnd_hf.losses import cached_contrastive_step, chunk_bounds

    bounds = chunk_bounds(len(index), chunk)

    def encode(i):
        start, end = bounds[i]
        return model(image[start:end], text[start:end])

    return cached_contrastive_step(
        loss_fn,
        encode,
        len(bounds),
        index,
        epoch=float(step),
        labels=labels,
        no_sync=model.no_sync,
        module=model,
    ).output


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (NaN payloads and the sign of zero included)."""
    a, b = torch.as_tensor(a).detach().contiguous(), torch.as_tensor(b).detach().contiguous()
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
    )


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
    if kind.startswith("sigmoid"):  # "_attract" ends in the name: glofnd, attract strategy
        return SigmoidLoss(detector, "attract" if kind.endswith("_attract") else "eliminate")
    return GlobalContrastiveLoss(
        N, detector, gamma=GammaSchedule(0.5, "constant"), temperature="learnable"
    )


EVAL_IMAGES = 70  # 5 batches of 16 (the last one short): 2 and 3 batches on two ranks
EVAL_BATCH = 16


def save_eval_inputs(folder):
    """A tiny CLIP and the first validation images of the digits, saved for the workers
    (the distributed-evaluation benchmark's inputs, at the tests' size)."""
    from benchmarks.distributed_eval import save_inputs

    save_inputs(str(folder), EVAL_IMAGES)


def eval_setup(folder):
    """The saved tiny CLIP and a zero-shot evaluator over the saved images, shared across
    the processes of a run."""
    from benchmarks.distributed_eval import make_evaluator

    return make_evaluator(str(folder), EVAL_BATCH, show_progress=True)
