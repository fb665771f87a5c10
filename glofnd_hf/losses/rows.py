"""The similarities of a batch, row chunk by row chunk (the loss of the cached step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fnd import comm


def chunk_bounds(batch_size: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk: ``chunk_size`` pairs, the last one possibly fewer."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be positive, got {chunk_size}")
    return [(s, min(s + chunk_size, batch_size)) for s in range(0, batch_size, chunk_size)]


class RowSimilarities:
    """The (2, rows, B) similarities of any local anchor rows against the global batch,
    computed on demand from the normalised (and gathered) embeddings.

    Those are held as leaves: each row chunk's backward stops there, and ``backward`` sends
    the accumulated gradients through normalisation (and the gather) once. ``leaf`` cuts the
    graph the same way for the loss's other inputs (scale, bias).
    """

    def __init__(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self._roots: list[torch.Tensor] = []
        self._leaves: list[torch.Tensor] = []
        self._collective: list[bool] = []
        image = F.normalize(image_embeds.to(dtype), dim=-1)
        text = F.normalize(text_embeds.to(dtype), dim=-1)
        self.image, self.text = self.leaf(image), self.leaf(text)
        if comm.world_size() == 1:
            self.all_image, self.all_text = self.image, self.text
        else:
            self.all_image = self.leaf(comm.all_gather_with_grad(image), collective=True)
            self.all_text = self.leaf(comm.all_gather_with_grad(text), collective=True)
        self.width = self.all_image.shape[0]

    def leaf(self, value: torch.Tensor, collective: bool = False) -> torch.Tensor:
        """``value`` detached, its gradient sent back by ``backward``. ``collective``: its
        backward is a collective, which every rank must run."""
        leaf = value.detach().requires_grad_(value.requires_grad)
        if value.requires_grad:
            self._roots.append(value)
            self._leaves.append(leaf)
            self._collective.append(collective)
        return leaf

    def __call__(self, start: int, end: int) -> torch.Tensor:
        return torch.stack(
            [self.image[start:end] @ self.all_text.t(), self.text[start:end] @ self.all_image.t()]
        )

    def backward(self) -> None:
        roots, grads = [], []
        for root, leaf, collective in zip(self._roots, self._leaves, self._collective, strict=True):
            grad = leaf.grad
            if grad is None and collective:
                grad = torch.zeros_like(leaf)
            if grad is not None:
                roots.append(root)
                grads.append(grad)
        if roots:
            torch.autograd.backward(roots, grads)
