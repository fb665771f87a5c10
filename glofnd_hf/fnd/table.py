"""Per-sample state tables keyed by dataset index, and the deterministic reduction of
duplicate indices that every update in this package goes through."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from . import comm

StateSharding = Literal["replicated", "sharded"]
"""replicated: every process holds every row; sharded: each row lives on one process
(dataset index % world size), which contributes it to the global batch's reads."""
STATE_SHARDINGS: tuple[str, ...] = ("replicated", "sharded")


def _filled_rows(
    count: int,
    row_shape: tuple[int, ...],
    fill: Sequence[float] | float,
    device: torch.device | str,
    pin_memory: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``count`` rows of ``row_shape`` and ``dtype`` set to ``fill``, on ``device`` (pinned
    host memory with ``pin_memory`` when a GPU is present)."""
    fill_row = torch.as_tensor(fill, dtype=dtype).expand(row_shape)
    data = fill_row.unsqueeze(0).repeat(count, *([1] * len(row_shape))).to(device)
    if pin_memory and data.device.type == "cpu" and torch.cuda.is_available():
        data = data.pin_memory()
    return data


class PerSampleTable:
    """A table of ``num_samples`` rows of shape ``row_shape``, keyed by dataset index (float32
    unless ``dtype`` says otherwise).

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
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.data = _filled_rows(self.num_samples, self.row_shape, fill, device, pin_memory, dtype)

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

    def loader(self) -> ShardRowLoader:
        """A loader of every row from the shards of a sharded run, one shard at a time."""
        return ShardRowLoader(self.data, self.num_samples, self.row_shape, 0, 1)

    def to(self, device: torch.device | str) -> PerSampleTable:
        self.data = self.data.to(device)
        return self


class ShardedPerSampleTable:
    """A :class:`PerSampleTable` split over the processes: row ``i`` lives on process
    ``i % world_size`` only, as its local row ``i // world_size``, so each process holds
    ``ceil(num_samples / world_size)`` rows (plus one scratch row).

    ``gather`` and ``scatter`` keep :class:`PerSampleTable`'s interface and results (bit for
    bit), under one condition: **every process calls them with the same ``index``** (the
    global batch's indices, as every caller in this package already passes them; they
    are collectives). ``gather``: each process fills the positions it owns into a buffer
    of ``-0.0`` and one all-reduce (sum) over the batch rows gives every process every row,
    ``len(index) x row bytes`` (O(batch), never O(N)). Adding ``-0.0`` changes no float (not
    ``+0.0``, ``-0.0``, inf or NaN), so the sum is exact whatever the reduction order.
    ``scatter``: each process writes the positions it owns; no communication. Repeated
    indices: as :class:`PerSampleTable`, they must carry identical rows; the owner writes
    them in the same order with the same ``index_copy_``.

    No data-dependent shapes (no boolean indexing, no ``unique``): positions a process does
    not own read its local row 0 (then masked) and write its scratch row.

    In one process (``world_size`` 1) it holds every row and behaves as
    :class:`PerSampleTable`. The all-reduce runs on ``gather``'s target device (the compute
    device, as NCCL needs), the table may stay in host memory.
    """

    def __init__(
        self,
        num_samples: int,
        row_shape: Sequence[int],
        fill: Sequence[float] | float,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.rank, self.world_size = comm.rank_and_world(rank, world_size)
        self.num_samples = int(num_samples)
        # Rows owned here: indices rank, rank + world, ... below num_samples.
        self.num_owned = max(0, -(-(self.num_samples - self.rank) // self.world_size))
        capacity = -(-self.num_samples // self.world_size)
        self.row_shape = tuple(int(s) for s in row_shape)
        # ``capacity`` rows (those past num_owned are padding) and the scratch row last.
        self.storage = _filled_rows(capacity + 1, self.row_shape, fill, device, pin_memory, dtype)
        # Rows read ahead by ``gather_together``: (index, device, rows), used once.
        self._read_ahead: tuple[torch.Tensor, torch.device, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def data(self) -> torch.Tensor:
        """The rows owned here (a view), in the order of :meth:`owned_index`."""
        return self.storage[: self.num_owned]

    def owned_index(self) -> torch.Tensor:
        """The dataset indices of the rows owned here, ascending (int64, on the CPU)."""
        return torch.arange(self.rank, self.num_samples, self.world_size, dtype=torch.long)

    def _local(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per position: whether this process owns it, and its local row (row 0 where not)."""
        if self.world_size == 1:
            return torch.ones_like(index, dtype=torch.bool), index
        mine = index.remainder(self.world_size) == self.rank
        return mine, torch.where(mine, index.div(self.world_size, rounding_mode="floor"), 0)

    def _check_group(self) -> None:
        if self.world_size > 1 and comm.world_size() != self.world_size:
            raise RuntimeError(
                f"a table sharded over {self.world_size} processes needs their process group "
                f"(this one has {comm.world_size()} process(es))"
            )

    def gather(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Rows at ``index`` (a copy), on ``device`` (default: the device of ``index``). A
        collective when sharded: every process passes the same ``index``."""
        device = torch.device(index.device if device is None else device)
        ahead, self._read_ahead = self._read_ahead, None
        if ahead is not None and ahead[0] is index and ahead[1] == device:
            return ahead[2]  # read with other tables' rows in one all-reduce
        rows = self._owned_rows(index, device)
        if self.world_size > 1:
            self._check_group()
            dist.all_reduce(rows)  # one owner per position, -0.0 elsewhere: exact
        return rows

    def _owned_rows(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rows at ``index`` on ``device``: the ones owned here, ``-0.0`` (0 for integer
        rows: exact too) at the positions other processes own."""
        to_host = self.storage.device.type == "cpu"
        index = index.to(self.storage.device, non_blocking=not to_host)
        mine, local = self._local(index)
        rows = self.storage.index_select(0, local)
        if self.world_size == 1:
            return rows.to(device, non_blocking=True)
        mask = mine.view(-1, *([1] * len(self.row_shape)))
        zero = -0.0 if rows.is_floating_point() else 0
        return torch.where(mask, rows, rows.new_full((), zero)).to(device, non_blocking=True)

    def scatter(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Write ``rows`` at ``index`` (each process its own). Repeated indices must carry
        identical rows."""
        self._read_ahead = None  # rows read ahead are stale once any row is written
        index = index.to(self.storage.device)
        mine, local = self._local(index)
        if self.world_size > 1:
            local = torch.where(mine, local, self.storage.shape[0] - 1)  # the scratch row
        self.storage.index_copy_(0, local, rows.to(self.storage.device, self.storage.dtype))

    def to(self, device: torch.device | str) -> ShardedPerSampleTable:
        self._read_ahead = None
        self.storage = self.storage.to(device)
        return self

    def full(self) -> torch.Tensor:
        """Every row, on every process (an all-gather: O(num_samples), for tests, small
        data sets and checkpoints in the replicated layout). A collective when sharded."""
        if self.world_size == 1:
            return self.data.clone()
        self._check_group()
        capacity = self.storage.shape[0] - 1
        padded = self.storage[:capacity].contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        # Row i is part i % world, local row i // world: interleave.
        stacked = torch.stack(parts, dim=1).reshape(-1, *self.row_shape)
        return stacked[: self.num_samples].clone()

    def load_full(self, rows: torch.Tensor) -> None:
        """Take this process's rows from every row (``num_samples`` of them, e.g. a
        replicated table's data)."""
        if rows.shape != (self.num_samples, *self.row_shape):
            raise ValueError(
                f"expected ({self.num_samples}, *{self.row_shape}) rows, got {tuple(rows.shape)}"
            )
        self._read_ahead = None
        self.data.copy_(rows[self.rank :: self.world_size])

    def shard_state_dict(self) -> dict[str, torch.Tensor]:
        """This process's rows as plain tensors (for a per-process safetensors file):
        ``rows`` (owned, in index order), ``index`` (their dataset indices), ``world_size``
        and ``num_samples`` (int64 scalars). No communication."""
        return {
            "rows": self.data.contiguous().cpu().clone(),
            "index": self.owned_index(),
            "world_size": torch.tensor(self.world_size, dtype=torch.long),
            "num_samples": torch.tensor(self.num_samples, dtype=torch.long),
        }

    def load_shards(self, shards: Sequence[dict[str, torch.Tensor]]) -> None:
        """Take this process's rows from the :meth:`shard_state_dict` of every process of
        a run with any number of processes (resharding 2 -> 3 reads all 2 shards and keeps
        a third of each). Every shard is checked first and nothing changes when one is bad:
        same ``num_samples`` and row shape, indices in range and each owned row present
        exactly once. No communication. To read shards one at a time: :meth:`loader`."""
        self._read_ahead = None
        loader = self.loader()
        for n, shard in enumerate(shards):
            loader.take(n, shard)
        loader.check()
        loader.commit()

    def loader(self) -> ShardRowLoader:
        """A loader of this process's rows from shards handed to it one at a time."""
        return ShardRowLoader(
            self.data, self.num_samples, self.row_shape, self.rank, self.world_size
        )


class ShardRowLoader:
    """The rows a table owns (``data``: all of them for a replicated table, world size 1),
    taken from the shards of a run with any number of processes, **one shard at a time**:
    a reader holds one shard file and one staged copy of the owned rows, never the whole
    set (resuming a sharded run stays O(N / world) per process). The table changes only at
    :meth:`commit`, after :meth:`check` found every owned row exactly once."""

    def __init__(
        self,
        data: torch.Tensor,
        num_samples: int,
        row_shape: tuple[int, ...],
        rank: int,
        world_size: int,
    ) -> None:
        self.data, self.num_samples, self.row_shape = data, num_samples, row_shape
        self.rank, self.world_size = rank, world_size
        self.staged = torch.empty(data.shape, dtype=data.dtype)  # on the host, not the GPU
        self.seen = torch.zeros(data.shape[0], dtype=torch.long)

    def take(self, n: int, shard: dict[str, torch.Tensor]) -> None:
        """Stage the owned rows of shard ``n`` (checked: ``num_samples``, row shape,
        indices in range); a ValueError names what is wrong."""
        missing = {"rows", "index", "num_samples"} - shard.keys()
        if missing:
            raise ValueError(f"shard {n} misses {sorted(missing)}")
        if int(shard["num_samples"]) != self.num_samples:
            raise ValueError(
                f"shard {n} holds rows of {int(shard['num_samples'])} samples, "
                f"expected {self.num_samples}"
            )
        rows, index = shard["rows"], shard["index"].to(torch.long)
        if index.dim() != 1 or tuple(rows.shape) != (index.shape[0], *self.row_shape):
            raise ValueError(
                f"shard {n}: {tuple(rows.shape)} rows for {tuple(index.shape)} indices, "
                f"expected rows of shape {self.row_shape}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(f"shard {n} holds indices outside [0, {self.num_samples})")
        mine = index.remainder(self.world_size) == self.rank
        local = index[mine].div(self.world_size, rounding_mode="floor")
        self.seen.index_add_(0, local, torch.ones_like(local))
        self.staged.index_copy_(0, local, rows[mine].to(self.staged.dtype))

    def check(self) -> None:
        """Every owned row staged exactly once, or a ValueError naming the first that is not."""
        if self.seen.numel() and not bool((self.seen == 1).all()):
            bad = int((self.seen != 1).to(torch.uint8).argmax())
            raise ValueError(
                f"the shards hold sample {bad * self.world_size + self.rank} "
                f"{int(self.seen[bad])} times, expected once"
            )

    def commit(self) -> None:
        self.data.copy_(self.staged.to(self.data.device))


def gather_together(tables: Sequence[object], index: torch.Tensor, device: torch.device) -> None:
    """Read the rows at ``index`` of every sharded float32 table among ``tables`` with one
    all-reduce instead of one each (a step that reads GloFND's thresholds and the global
    loss's u for the same global batch waits for one collective's latency, not two). Each
    table hands its rows to its next ``gather`` with this very ``index`` tensor and
    ``device``; a ``scatter`` first drops them. A collective: every process calls it alike.
    Fewer than two such tables: nothing is read (each reads its own)."""
    together = [
        t
        for t in tables
        if isinstance(t, ShardedPerSampleTable)
        and t.world_size > 1
        and t.storage.dtype == torch.float32
    ]
    if len(together) < 2:
        return
    device = torch.device(device)
    parts = [t._owned_rows(index, device) for t in together]
    together[0]._check_group()
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
    dist.all_reduce(flat)  # one owner per position, -0.0 elsewhere: exact
    start = 0
    for table, part in zip(together, parts, strict=True):
        width = part[0].numel()
        rows = flat[:, start : start + width].reshape(part.shape).contiguous()
        table._read_ahead = (index, device, rows)
        start += width


def make_table(
    num_samples: int,
    row_shape: Sequence[int],
    fill: Sequence[float] | float,
    device: torch.device | str = "cpu",
    pin_memory: bool = False,
    sharding: StateSharding = "replicated",
    dtype: torch.dtype = torch.float32,
) -> PerSampleTable | ShardedPerSampleTable:
    """A per-sample table, replicated on every process or sharded across them."""
    if sharding == "replicated":
        return PerSampleTable(num_samples, row_shape, fill, device, pin_memory, dtype)
    if sharding == "sharded":
        return ShardedPerSampleTable(num_samples, row_shape, fill, device, pin_memory, dtype=dtype)
    raise ValueError(f"state sharding must be one of {STATE_SHARDINGS}, got {sharding!r}")


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
