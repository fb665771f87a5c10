"""Per-sample state tables keyed by dataset index, and the deterministic reduction of
duplicate indices that every update in this package goes through."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


class StateError(ValueError):
    """Stored per-sample state that cannot be loaded: the message names the entry (and the
    first bad sample) and what was expected."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"state entry {key!r}: {problem}")
        self.key = key
        self.problem = problem

    def within(self, prefix: str) -> StateError:
        """The same error for the entry's name as stored under ``prefix``."""
        return StateError(prefix + self.key, self.problem)


@dataclass(frozen=True)
class ValueRange:
    """Valid values of a stored state entry: finite, within [low, high], integers only when
    ``integer``; NaN only when ``nan_ok`` (an unset marker)."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    nan_ok: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low == -math.inf and self.high == math.inf:
            text = kind
        elif self.high == math.inf:
            text = f"{kind} >= {self.low:g}"
        elif self.low == -math.inf:
            text = f"{kind} <= {self.high:g}"
        else:
            text = f"{kind} in [{self.low:g}, {self.high:g}]"
        return text + (" (or NaN)" if self.nan_ok else "")

    def invalid(self, values: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the entries outside this range (+-inf always is)."""
        bad = ~((values >= self.low) & (values <= self.high))  # NaN fails both comparisons
        if values.is_floating_point():
            bad |= torch.isinf(values)
            if self.integer:
                bad |= values != torch.round(values)
            if self.nan_ok:
                bad &= ~torch.isnan(values)
        return bad


FINITE = ValueRange()
NON_NEGATIVE = ValueRange(low=0.0)
COUNT = ValueRange(low=0.0, integer=True)


def check_state_tensor(
    key: str,
    value: object,
    shape: Sequence[int] | None,
    dtypes: Sequence[torch.dtype] | torch.dtype = torch.float32,
    valid: ValueRange | None = FINITE,
    shape_hint: str = "was it saved for a data set of another size?",
) -> None:
    """Raise :class:`StateError` unless ``value`` is a tensor of ``shape`` (None: any),
    one of ``dtypes`` (nothing is cast silently) and every entry is ``valid`` (None: no
    value check). The message names the first bad sample and its value."""
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    if not isinstance(value, torch.Tensor):
        raise StateError(key, f"is a {type(value).__name__}, expected a tensor")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise StateError(
            key, f"has shape {tuple(value.shape)}, expected {tuple(shape)}: {shape_hint}"
        )
    if value.dtype not in dtypes:
        expected = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise StateError(
            key, f"has dtype {str(value.dtype).removeprefix('torch.')}, expected {expected}"
        )
    if valid is None or value.dtype == torch.bool or value.numel() == 0:
        return
    bad = valid.invalid(value)
    if bool(bad.any()):
        first = bad.reshape(-1).to(torch.uint8).argmax()  # no list of every bad entry
        position = tuple(int(i) for i in torch.unravel_index(first, value.shape))
        if value.numel() == 1:
            where = "it"
        elif value.dim() == 1:
            where = f"sample {position[0]}"
        else:
            where = f"position {list(position)}"
        raise StateError(
            key,
            f"{where} holds {value[position].item()!r}, expected {valid.describe()} "
            f"({int(bad.sum())} invalid entr{'y' if int(bad.sum()) == 1 else 'ies'})",
        )


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
