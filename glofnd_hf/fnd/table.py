"""Per-sample state tables keyed by dataset index, and the deterministic reduction of
duplicate indices that every update in this package goes through."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PerSampleTable:
    """A float32 table of ``num_samples`` rows of shape ``row_shape``, keyed by dataset index.

    The table may live on another device than the computation (for example in host memory
    while the model trains on a GPU): ``gather`` brings rows to the compute device and
    ``scatter`` writes them back. Both are a single index operation over the touched rows,
    so their cost depends on the batch, not on ``num_samples``.
    """

    def __init__(
        self,
        num_samples: int,
        row_shape: Sequence[int],
        fill: Sequence[float] | float,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        self.row_shape = tuple(int(s) for s in row_shape)
        fill_row = torch.as_tensor(fill, dtype=torch.float32).expand(self.row_shape)
        data = fill_row.unsqueeze(0).repeat(self.num_samples, *([1] * len(self.row_shape)))
        self.data = data.to(device)
        if pin_memory and self.data.device.type == "cpu" and torch.cuda.is_available():
            self.data = self.data.pin_memory()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def gather(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Rows at ``index`` (a copy), on ``device`` (default: the device of ``index``)."""
        device = index.device if device is None else device
        # A non-blocking copy *to the host* may return before the data lands: block then.
        to_host = self.data.device.type == "cpu"
        rows = self.data.index_select(0, index.to(self.data.device, non_blocking=not to_host))
        return rows.to(device, non_blocking=True)

    def scatter(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows`` at ``index``. Repeated indices must carry identical rows."""
        self.data.index_copy_(
            0, index.to(self.data.device), rows.to(self.data.device, self.data.dtype)
        )

    def to(self, device: torch.device | str) -> PerSampleTable:
        self.data = self.data.to(device)
        return self


def segment_mean(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For every position, the mean of ``values`` over all positions with the same index.

    Used to resolve duplicate dataset indices in one update deterministically: every copy of
    an index receives the same averaged value, so writing them back with ``index_copy_`` gives
    the same table whatever order the writes land in, on every rank. No data-dependent shapes
    (no ``unique``), hence no host-device synchronisation. Sums run in float64 prefix sums,
    which keeps the differences exact enough for batches of any practical size.
    """
    n = index.shape[0]
    if n == 0:
        return values
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    sorted_values = values[order].double()
    positions = torch.arange(n, device=index.device)
    is_start = torch.ones(n, dtype=torch.bool, device=index.device)
    is_start[1:] = sorted_index[1:] != sorted_index[:-1]
    is_end = torch.ones(n, dtype=torch.bool, device=index.device)
    is_end[:-1] = is_start[1:]
    start = torch.cummax(torch.where(is_start, positions, 0), dim=0).values
    end = torch.cummin(torch.where(is_end, positions, n).flip(0), dim=0).values.flip(0)
    prefix = torch.cat([sorted_values.new_zeros((1, *values.shape[1:])), sorted_values.cumsum(0)])
    count = (end - start + 1).to(torch.float64).view(-1, *([1] * (values.dim() - 1)))
    means_sorted = (prefix[end + 1] - prefix[start]) / count
    # Unique indices (the usual case) keep their value bit for bit.
    means_sorted = torch.where(count == 1, sorted_values, means_sorted)
    means = torch.empty_like(means_sorted)
    means[order] = means_sorted
    return means.to(values.dtype)
