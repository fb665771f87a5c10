"""IFND's per-sample state in per-sample tables: the feature bank, the seen flags, and per
granularity each sample's pseudo-label, confidence and acceptance rank; replicated on every
process or sharded across them like GloFND's thresholds (``fnd.table.make_table``: row i on
process i % world). Also the checks a stored state goes through before it is loaded."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .ifnd_config import BANK_DTYPES
from .table import (
    COUNT,
    NON_NEGATIVE,
    PerSampleTable,
    ShardedPerSampleTable,
    StateError,
    StateSharding,
    ValueRange,
    check_state_tensor,
    make_table,
)

LABEL, CONFIDENCE, RANK = 0, 1, 2
"""Columns of the assignments table: (N, G, 3) float32 (labels are small integers, exact
in float32), so that a step reads a batch's labels and ranks with one gather."""
ASSIGNMENT_FILL = (-1.0, math.nan, math.inf)  # never clustered: no label, never accepted
SCALARS = ("num_clusters", "last_round_epoch", "first_epoch", "rounds", "round_seconds")
Table = PerSampleTable | ShardedPerSampleTable


class IFNDTables:
    """The bank (allocated once its width is known), the seen flags and the assignments."""

    def __init__(
        self,
        num_samples: int,
        num_clusters: Sequence[int],
        bank_dtype: torch.dtype,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        sharding: StateSharding = "replicated",
    ) -> None:
        self.num_samples = int(num_samples)
        self.num_clusters = tuple(num_clusters)
        self.dtype = bank_dtype
        self.pin_memory = pin_memory
        self.sharding: StateSharding = sharding
        self.bank: Table | None = None
        self.seen = self._table((), False, device, torch.bool)
        g = len(self.num_clusters)
        self.assignments = self._table((g, 3), ASSIGNMENT_FILL, device, torch.float32)

    def _table(
        self, shape: tuple[int, ...], fill: object, device: torch.device | str, dtype: torch.dtype
    ) -> Table:
        n = self.num_samples
        return make_table(n, shape, fill, device, self.pin_memory, self.sharding, dtype)

    @property
    def device(self) -> torch.device:
        return self.seen.device

    @property
    def split(self) -> bool:
        """Whether the rows are split over more than one process."""
        return isinstance(self.seen, ShardedPerSampleTable) and self.seen.world_size > 1

    def local_index(self) -> torch.Tensor:
        """The dataset indices of the rows held here, ascending."""
        if isinstance(self.seen, ShardedPerSampleTable):
            return self.seen.owned_index().to(self.device)
        return torch.arange(self.num_samples, device=self.device)

    def allocate_bank(self, width: int) -> None:
        self.bank = self._table((width,), 0.0, self.device, self.dtype)

    def fit_bank(self, width: int) -> None:
        """A bank of ``width`` (a checkpoint's, before its rows load): allocated when there
        is none, dropped for width 0; a bank of another width is refused (another model)."""
        if self.bank is not None and width and self.bank.row_shape[0] != width:
            raise ValueError(
                f"the checkpoint's bank holds {width} features per sample, this detector's "
                f"{self.bank.row_shape[0]}"
            )
        if not width:
            self.bank = None
        elif self.bank is None:
            self.allocate_bank(width)

    def write(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """Bank rows of the global batch (repeated indices carrying identical rows): each
        process writes those it holds."""
        self.bank.scatter(index, features)
        self.seen.scatter(index, torch.ones(index.shape[0], dtype=torch.bool))

    def read(
        self, anchor_index: torch.Tensor, candidate_index: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (b, G, 3) and (B, G, 3) assignment rows of the anchors and the global batch.
        Split: one gather of the global batch (a collective), the anchors its slice at this
        process's rank (the global batch holds the ranks' anchors rank after rank)."""
        rows = self.assignments.gather(candidate_index, device)
        if not self.split:
            return self.assignments.gather(anchor_index, device), rows
        b = anchor_index.shape[0]
        start = self.seen.rank * b
        return rows[start : start + b], rows

    def set_local(self, labels: torch.Tensor, confidence: torch.Tensor, rank: torch.Tensor) -> None:
        """A round's (G, n) results for the rows held here."""
        data = self.assignments.data
        data[:, :, LABEL] = labels.t().to(data.device, torch.float32)
        data[:, :, CONFIDENCE] = confidence.t().to(data.device)
        data[:, :, RANK] = rank.t().to(data.device)

    @staticmethod
    def _every(table: Table) -> torch.Tensor:
        """Every sample's rows (split: an all-gather of O(N), a collective)."""
        return table.full() if isinstance(table, ShardedPerSampleTable) else table.data

    def every_seen(self) -> torch.Tensor:
        return self._every(self.seen)

    def every_column(self, column: int) -> torch.Tensor:
        """(G, N) of one assignments column, every sample's (a collective when split)."""
        return self._every(self.assignments)[:, :, column].t()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The per-sample entries of IFND's state dict, every sample's (split: gathered)."""
        if self.bank is None:
            bank = torch.zeros(self.num_samples, 0, dtype=self.dtype)
        else:
            bank = self._every(self.bank)
        assignments = self._every(self.assignments).cpu()

        def column(c: int) -> torch.Tensor:  # (G, N), a copy
            return assignments[:, :, c].t().clone(memory_format=torch.contiguous_format)

        return {
            "bank": bank.detach().cpu().clone(),
            "seen": self._every(self.seen).cpu().clone(),
            "labels": column(LABEL).to(torch.int32),
            "confidence": column(CONFIDENCE),
            "accept_rank": column(RANK),
        }

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Take every sample's entries of a checked state dict (each process its rows)."""
        bank = state["bank"]
        if bank.shape[1] == 0:
            self.bank = None
        else:
            self.allocate_bank(bank.shape[1])
            _load_rows(self.bank, bank)
        _load_rows(self.seen, state["seen"])
        columns = [state["labels"].float(), state["confidence"], state["accept_rank"]]
        _load_rows(self.assignments, torch.stack(columns, -1).transpose(0, 1))

    def shard_tables(self) -> dict[str, Table]:
        """The tables by name for per-process checkpoints; an unallocated bank as rows of
        width 0."""
        bank = self.bank
        if bank is None:
            bank = make_table(self.num_samples, (0,), 0.0, self.device, False, self.sharding)
        return {"bank": bank, "seen": self.seen, "assignments": self.assignments}

    def check_shard_rows(self, name: str, rows: torch.Tensor) -> None:
        """Raise :class:`StateError` unless stored ``rows`` of table ``name`` hold what
        loading a state dict accepts."""
        if name == "bank":
            check_state_tensor("bank", rows, None, tuple(BANK_DTYPES.values()))
        elif name == "seen":
            check_state_tensor("seen", rows, None, torch.bool, None)
        elif name == "assignments":
            check_state_tensor("assignments", rows, None, torch.float32, None)
            check_assignments(
                rows[:, :, LABEL].t(),
                rows[:, :, CONFIDENCE].t(),
                rows[:, :, RANK].t(),
                self.num_clusters,
            )
        else:
            raise ValueError(f"unexpected ifnd table {name!r}")

    def to(self, device: torch.device | str) -> None:
        for table in (self.bank, self.seen, self.assignments):
            if table is not None:
                table.to(device)


def _load_rows(table: Table, rows: torch.Tensor) -> None:
    if isinstance(table, ShardedPerSampleTable):
        table.load_full(rows.to(table.data.dtype))
    else:
        table.data.copy_(rows)


def check_assignments(
    labels: torch.Tensor,
    confidence: torch.Tensor,
    rank: torch.Tensor,
    num_clusters: Sequence[int],
) -> None:
    """(G, n) labels in [-1, k - 1] per granularity; where labelled, finite confidences and
    ranks in [0, 1] (a sample never clustered has NaN confidence and infinite rank)."""
    for level, k in enumerate(num_clusters):
        check_state_tensor(
            f"labels[{level}]", labels[level], None, labels.dtype, ValueRange(-1, k - 1, True)
        )
    labelled = labels >= 0
    check_state_tensor("confidence", torch.where(labelled, confidence, 0.0), None)
    ranks = torch.where(labelled, rank, 1.0)
    check_state_tensor("accept_rank", ranks, None, torch.float32, ValueRange(0.0, 1.0))


def check_num_clusters(value: torch.Tensor, num_clusters: Sequence[int]) -> None:
    check_state_tensor("num_clusters", value, None, torch.int64, None)
    if tuple(value.tolist()) != tuple(num_clusters):
        raise ValueError(
            f"checkpoint clustered with k={value.tolist()}, the configuration says "
            f"{list(num_clusters)}"
        )


def check_scalars(state: dict[str, torch.Tensor], num_clusters: Sequence[int]) -> None:
    """The entries of IFND's state that are not per sample (the same on every process)."""
    scalar = (1,)
    check_num_clusters(state["num_clusters"], num_clusters)
    check_state_tensor("rounds", state["rounds"], scalar, torch.int64, COUNT)
    check_state_tensor("round_seconds", state["round_seconds"], scalar, torch.float64, NON_NEGATIVE)
    epoch = ValueRange(low=0.0, nan_ok=True)
    check_state_tensor("first_epoch", state["first_epoch"], scalar, torch.float64, epoch)
    check_state_tensor("last_round_epoch", state["last_round_epoch"], scalar, torch.float64, epoch)


def check_state(state: dict[str, torch.Tensor], n: int, num_clusters: Sequence[int]) -> None:
    """Every entry of a stored state dict: shape, dtype and values (nothing is cast)."""
    g = len(num_clusters)
    check_num_clusters(state["num_clusters"], num_clusters)
    bank = state["bank"]
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or bank.shape[0] != n:
        shape = tuple(bank.shape) if isinstance(bank, torch.Tensor) else None
        raise StateError("bank", f"has shape {shape}, expected ({n}, D)")
    check_state_tensor("bank", bank, None, tuple(BANK_DTYPES.values()))
    check_state_tensor("seen", state["seen"], (n,), torch.bool, None)
    labels = state["labels"]
    check_state_tensor("labels", labels, (g, n), torch.int32, ValueRange(low=-1, integer=True))
    check_state_tensor("confidence", state["confidence"], (g, n), torch.float32, None)
    check_state_tensor("accept_rank", state["accept_rank"], (g, n), torch.float32, None)
    check_assignments(labels, state["confidence"], state["accept_rank"], num_clusters)
    check_scalars(state, num_clusters)
