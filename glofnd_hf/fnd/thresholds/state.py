"""The per-sample threshold state of both sides: one (N, 2, C) table of the rule's columns,
a per-side common shift and the rule's per-side quantities, and checked loading of stored
states."""

from __future__ import annotations

import torch

from ..interface import SIDES
from ..table import StateSharding, check_state_tensor, make_table
from .config import LAMBDA, GloFNDConfig, ThresholdRule


class ThresholdState:
    """Thresholds and the rule's per-sample quantities of both sides for ``num_samples``.

    Stored as one (N, 2, C) float32 table (side x the rule's columns) so that a step reads
    and writes every quantity of the touched anchors with a single gather and a single
    scatter: 72 bytes per sample with the pinball rule, 64 with tail, 32 with Adam. Host memory is fine for
    large N.
    """

    def __init__(
        self,
        num_samples: int,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        rule: ThresholdRule | None = None,
        sharding: StateSharding = "replicated",
    ) -> None:
        self.rule = rule or GloFNDConfig().rule()
        self.columns = self.rule.columns
        # ``sharded``: each process holds the rows it owns (fnd.table.ShardedPerSampleTable);
        # reading rows is then a collective (every caller passes the global batch's index).
        self.sharding: StateSharding = sharding
        self.table = make_table(
            num_samples,
            (len(SIDES), len(self.columns)),
            fill=list(self.rule.fill),
            device=device,
            pin_memory=pin_memory,
            sharding=sharding,
        )
        # The sides' accumulated common shift (the rule's ``frame`` columns of the table are
        # stored relative to it), so that a shift of every anchor's tail moves every
        # threshold in O(1), not only those of the batch that showed it. Folded into the
        # table whenever the state is read out whole (``state_dict``).
        self.frame = torch.zeros(len(SIDES))
        self._frame_columns = list(self.rule.frame)
        # The rule's per-side quantities (``side_columns``; none for most rules).
        self.sides = self.rule.side_start()
        ranges = [self.rule.valid[c] for c in self._frame_columns]
        self._frame_range = (
            torch.tensor([r.low for r in ranges]),
            torch.tensor([r.high for r in ranges]),
        )

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def bytes_per_sample(self) -> int:
        return self.rule.bytes_per_sample()

    def to(self, device: torch.device | str) -> ThresholdState:
        self.table.to(device)
        return self

    def rows(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """The (len(index), 2, C) state rows of ``index``, in similarity units."""
        return self._shifted(self.table.gather(index, device), 1.0)

    @staticmethod
    def thresholds_of(rows: torch.Tensor) -> torch.Tensor:
        """The thresholds held in ``rows`` (..., 2, C): (..., 2)."""
        return rows[..., LAMBDA]

    def iterates_of(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The values the rule steps, held in ``rows`` (..., 2, C): (..., 2); None where the
        rule steps its thresholds themselves (the pinball rule's iterate, which its
        threshold averages)."""
        point = self.rule.point
        return None if point == LAMBDA else rows[..., point]

    @staticmethod
    def visits(rows: torch.Tensor) -> torch.Tensor:
        """The visit counts held in ``rows`` (..., 2, C): (..., 2) (every rule keeps the count
        last and adds one for each step it takes)."""
        return rows[..., -1]

    @classmethod
    def visited(cls, rows: torch.Tensor) -> torch.Tensor:
        """Whether each anchor and side of ``rows`` was visited before."""
        return cls.visits(rows) > 0

    def statistics(
        self, rows: torch.Tensor, sim: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        """The rule's (2, n, k) statistics of one visit for the n anchors whose (n, 2, C)
        ``rows`` these are, from their (2, n, B) similarities: taken at the rule's point
        (the threshold, or the iterate that the threshold averages)."""
        point = rows[..., self.rule.point].t().to(sim.dtype)
        return self.rule.statistics(sim, negatives, point)

    def lambdas(self, index: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Thresholds of ``index`` as a (len(index), 2) tensor [image side, text side]."""
        return self.rows(index, device)[..., LAMBDA]

    def _shifted(self, rows: torch.Tensor, sign: float) -> torch.Tensor:
        """``rows`` with the frame added to (sign 1) or taken from (-1) its frame columns."""
        if not self._frame_columns:
            return rows
        self.frame = self.frame.to(rows.device)
        shift = torch.zeros(rows.shape[-2:], dtype=rows.dtype, device=rows.device)
        shift[:, self._frame_columns] = sign * self.frame.to(rows.dtype).unsqueeze(-1)
        rows = rows + shift
        if sign > 0:  # a shifted threshold stays a similarity
            rows[..., self._frame_columns] = self._in_range(rows[..., self._frame_columns])
        return rows

    def _in_range(self, values: torch.Tensor) -> torch.Tensor:
        low, high = (bound.to(values.device, values.dtype) for bound in self._frame_range)
        return torch.maximum(torch.minimum(values, high), low)

    def _fold_frame(self) -> None:
        if self._frame_columns and bool(self.frame.ne(0).any()):
            data = self.table.data
            columns = data[..., self._frame_columns]
            shift = self.frame.to(data.device, data.dtype).unsqueeze(-1)
            data[..., self._frame_columns] = self._in_range(columns + shift)
        self.frame = torch.zeros_like(self.frame)

    def _all_rows(self) -> torch.Tensor:
        """Every sample's (N, 2, C) rows: the table itself, or when sharded the rows of
        every process (an all-gather of O(N): a collective, every process calls it)."""
        return self.table.data if self.sharding == "replicated" else self.table.full()

    def side_keys(self) -> list[str]:
        """The names the rule's per-side quantities are stored under, ``<side>.<name>``, in
        the order of ``sides`` flattened."""
        return [f"{side}.{name}" for side in SIDES for name in self.rule.side_columns]

    def side_state(self) -> dict[str, torch.Tensor]:
        """The rule's per-side quantities as ``side_keys`` tensors of shape (1,) (stored with
        the state, and with every shard of a per-process checkpoint)."""
        values = self.sides.cpu().reshape(-1)
        return {name: values[i : i + 1].clone() for i, name in enumerate(self.side_keys())}

    def load_side_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take :meth:`side_state`'s entries from ``state`` (checked first); a state saved
        before the rule kept them, without any, starts them afresh."""
        names = self.side_keys()
        if not any(name in state for name in names):
            self.sides = self.rule.side_start(self.sides.device)
            return
        for name in names:
            if name not in state:
                raise ValueError(f"threshold state lacks {name!r}")
            check_state_tensor(name, state[name], (1,))
        values = torch.stack([state[name].to(torch.float32) for name in names])
        self.sides = values.view(len(SIDES), -1).to(self.sides.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous tensors, one per side and quantity, storable with safetensors:
        the thresholds as they filter (the common shift is folded into the table first),
        and the rule's per-side quantities. Sharded: every sample's, gathered from every
        process (a collective)."""
        self._fold_frame()
        data = self._all_rows()
        return {
            **{
                f"{side}.{column}": data[:, s, c].contiguous().cpu()
                for s, side in enumerate(SIDES)
                for c, column in enumerate(self.columns)
            },
            **self.side_state(),
        }

    def shard_tables(self) -> dict:
        """The per-sample table by name (``thresholds``), the common shift folded in first
        (no communication: each process folds its own rows), for per-process checkpoints:
        rows written to or loaded into it directly are the thresholds as they filter."""
        self._fold_frame()
        return {"thresholds": self.table}

    def check_shard_rows(self, name: str, rows: torch.Tensor) -> None:
        """Raise :class:`StateError` unless ``rows`` (of :meth:`shard_tables`' ``name``,
        any number of them) hold values in the rule's column ranges, as loading checks."""
        if name != "thresholds":
            raise ValueError(f"unexpected threshold table {name!r}")
        for s, side in enumerate(SIDES):
            for c, (column, valid) in enumerate(zip(self.columns, self.rule.valid, strict=True)):
                check_state_tensor(f"{side}.{column}", rows[:, s, c], None, valid=valid)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict`, every entry checked first (nothing is changed when one
        is bad): shape (N,), dtype float32, values in the rule's column ranges."""
        state = self.rule.upgrade(state)
        expected = {f"{side}.{column}" for side in SIDES for column in self.columns}
        missing = expected - state.keys()
        unexpected = state.keys() - expected - set(self.side_keys())
        if missing or unexpected:
            raise ValueError(
                f"threshold state keys do not match: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)} (the state holds "
                f"{', '.join(self.columns)} per side for update_rule "
                f"{self.rule.config.update_rule!r}: was it saved with another rule?)"
            )
        for side in SIDES:
            for column, valid in zip(self.columns, self.rule.valid, strict=True):
                check_state_tensor(
                    f"{side}.{column}", state[f"{side}.{column}"], (self.num_samples,), valid=valid
                )
        self.load_side_state(state)  # checked before any row changes
        if self.sharding == "replicated":
            for s, side in enumerate(SIDES):
                for c, column in enumerate(self.columns):
                    self.table.data[:, s, c].copy_(state[f"{side}.{column}"])
        else:  # every sample's rows (a replicated state): each process keeps its own
            columns = [
                torch.stack([state[f"{side}.{column}"] for column in self.columns], -1)
                for side in SIDES
            ]
            self.table.load_full(torch.stack(columns, 1))
        self.frame = torch.zeros_like(self.frame)

    def update(
        self,
        index: torch.Tensor,
        stats: torch.Tensor,
        epoch: float,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One threshold step for the anchors ``index``; returns their new (n, 2, C) rows.
        ``stats``: (n, 2, num_statistics), equal for repeated indices (``segment_mean``);
        ``rows``: their current rows when the caller has already read them."""
        if rows is None:
            rows = self.rows(index, stats.device)
        self.sides = self.sides.to(stats.device)
        rows, shift, sides = self.rule.update(rows, stats, epoch, self.sides)
        if sides is not None:
            self.sides = sides
        if shift is not None:
            # The shift accrued since the batch's anchors' last visit, about an epoch ago;
            # every other anchor moves by the share of it that accrued during this step
            # (the share of an epoch that one batch is), so that anchors visited since are
            # not moved twice.
            share = min(1.0, index.numel() / self.num_samples)
            self.frame = self.frame.to(shift.device) + share * shift
        self.table.scatter(index, self._shifted(rows, -1.0))
        return rows
