"""A contrastive batch larger than the device holds: the cached-gradient (GradCache) step.

The loss of a contrastive batch depends on every pair's embedding, but its gradient with
respect to the model factors through those embeddings. So the step runs in two passes:

1. encode the batch chunk by chunk without gradients (only the embeddings are kept), run the
   loss once on the whole batch -- the detector's update and masks included, exactly once --
   and keep the gradient of the loss with respect to each embedding and to the logit scale
   (and bias, for a sigmoid loss). The loss itself runs in row chunks of the same size
   (``backward_by_rows``), so its (2, b, B) similarities are never held whole either;
2. encode each chunk again with gradients and back-propagate ``<embedding, cached gradient>``
   through it, so the chunk's activations are freed before the next chunk runs.

The parameters' gradients equal those of one backward through the chunks' forwards. The
random state (dropout) is saved before each chunk of the first pass and restored before the
same chunk of the second, so both passes compute the same embeddings. Torch only: the caller
supplies the forward (``encode``), the backward (e.g. ``accelerator.backward``, which applies
a mixed-precision loss scale) and a way to skip the gradient synchronisation of data
parallelism (``no_sync``) for all chunks but the last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import BimodalContrastiveLoss, LossOutput
from .rows import chunk_bounds

Encode = Callable[[int], tuple[Tensor, ...]]
"""``encode(i)``: image embeddings, text embeddings and logit scale of chunk ``i``, and the
logit bias where the model has one (SigLIP; ``None`` or left out otherwise)."""

__all__ = ["CachedStepResult", "Encode", "RandomState", "cached_contrastive_step", "chunk_bounds"]


@dataclass
class RandomState:
    """torch's global random state: the CPU generator and, where used, the CUDA one."""

    cpu: Tensor
    cuda: Tensor | None
    cuda_device: int | None

    @classmethod
    def capture(cls, device: torch.device | None = None) -> RandomState:
        if device is not None and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(index), index)
        return cls(torch.get_rng_state(), None, None)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


@contextlib.contextmanager
def _buffers_kept(module: nn.Module | None) -> Iterator[None]:
    """Undo what a forward writes into buffers (batch-norm running statistics), so that the
    two passes update them once, as one forward does."""
    if module is None:
        yield
        return
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@dataclass
class CachedStepResult:
    output: LossOutput
    """The loss (detached) and its statistics, as the loss called on the whole batch gives."""
    logit_scale: Tensor
    """The logit scale of the batch (detached), for logging."""
    logit_bias: Tensor | None = None
    """The logit bias of the batch (detached), where the model has one."""


def cached_contrastive_step(
    loss: BimodalContrastiveLoss,
    encode: Encode,
    num_chunks: int,
    index: Tensor | None = None,
    *,
    epoch: float = 0.0,
    labels: Tensor | None = None,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    loss_weight: float = 1.0,
    module: nn.Module | None = None,
    device: torch.device | None = None,
) -> CachedStepResult:
    """One loss evaluation and backward over ``num_chunks`` chunks of this process's batch.

    ``index`` and ``labels`` cover the whole local batch (chunks in order). ``loss_weight``
    multiplies the gradients (``1 / gradient_accumulation_steps``). ``module``: its buffers
    are restored after the first pass. ``device``: the device whose random state is replayed
    besides the CPU's (default: that of ``module``'s parameters).
    Gradients accumulate into the parameters' ``.grad`` like ``backward`` does.
    """
    # Long: both passes share the chunk bounds, the no-grad embeddings and the RNG states.
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be positive, got {num_chunks}")
    if device is None and module is not None:
        device = next((p.device for p in module.parameters()), None)
    states: list[RandomState] = []
    images, texts = [], []
    with torch.no_grad(), _buffers_kept(module):
        for i in range(num_chunks):
            states.append(RandomState.capture(device))
            image, text, scale, bias = _unpack(encode(i))
            images.append(image)
            texts.append(text)
    sizes = [len(t) for t in images]
    # float32 leaves (float64 kept): the loss computes in float32 anyway, and float32
    # gradients do not underflow the way float16 ones would without the loss scale.
    dtype = torch.promote_types(images[0].dtype, torch.float32)
    image_leaf = torch.cat(images).to(dtype).requires_grad_()
    text_leaf = torch.cat(texts).to(dtype).requires_grad_()
    # The logit scale (and bias) reach the loss directly, not through the embeddings: leaves
    # of their own whose gradients go into the last chunk's backward.
    scale_leaf = scale.detach().to(dtype).clone().requires_grad_()
    bias_leaf = None if bias is None else bias.detach().to(dtype).clone().requires_grad_()
    del images, texts
    with torch.enable_grad():
        # Row chunks of the same size: the (2, b, B) similarities are never held whole.
        out = loss.backward_by_rows(
            image_leaf,
            text_leaf,
            scale_leaf,
            index,
            epoch=epoch,
            labels=labels,
            logit_bias=bias_leaf,
            rows_per_chunk=max(sizes),
        )  # a float32 graph with no parameters in it: no loss scale needed
    after_loss = RandomState.capture(device)  # anything the loss drew stays drawn
    logit_scale = scale_leaf.detach().to(scale.dtype)
    logit_bias = None if bias_leaf is None else bias_leaf.detach().to(bias.dtype)
    image_grads = (image_leaf.grad * loss_weight).split(sizes)
    text_grads = (text_leaf.grad * loss_weight).split(sizes)
    scalar_grads = [
        None if leaf is None or leaf.grad is None else leaf.grad * loss_weight
        for leaf in (scale_leaf, bias_leaf)
    ]
    del image_leaf, text_leaf, scale_leaf, bias_leaf  # the loss's output is detached

    for i in range(num_chunks):
        last = i == num_chunks - 1
        # Data parallelism: accumulate locally, reduce once with the last chunk.
        with contextlib.nullcontext() if last else no_sync():
            states[i].restore()
            image, text, scale, bias = _unpack(encode(i))
            if image.shape[0] != sizes[i]:
                raise RuntimeError(f"chunk {i} changed size between the passes")
            surrogate = (image.to(dtype) * image_grads[i]).sum() + (
                text.to(dtype) * text_grads[i]
            ).sum()
            if last:
                for value, grad in zip((scale, bias), scalar_grads, strict=True):
                    if grad is not None and value is not None and value.requires_grad:
                        surrogate = surrogate + (value.to(dtype) * grad).sum()
            backward(surrogate)
            del image, text, surrogate
    after_loss.restore()
    return CachedStepResult(out, logit_scale, logit_bias)


def _unpack(encoded: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    image, text, scale, *rest = encoded
    return image, text, scale, (rest[0] if rest else None)
