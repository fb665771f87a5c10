"""Bytes the collectives of a piece of code hand to ``torch.distributed``, counted at the
dispatcher: ``c10d`` ops (``dist.all_reduce``, ``dist.all_gather``, ...) and the functional
collectives (``torch.distributed._functional_collectives``, differentiable, their backward
included), whatever module calls them."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Collectives by dispatcher op: which argument holds the input each process hands in.
COLLECTIVES = {
    "c10d.allreduce_": (0, "all_reduce"),
    "c10d.allgather_": (1, "all_gather"),
    "c10d._allgather_base_": (1, "all_gather"),
    "c10d.allgather_into_tensor_coalesced_": (1, "all_gather"),
    "c10d.broadcast_": (0, "broadcast"),
    "c10d.reduce_scatter_": (1, "reduce_scatter"),
    "c10d._reduce_scatter_base_": (1, "reduce_scatter"),
    "c10d.alltoall_base_": (1, "all_to_all"),
    "_c10d_functional.all_reduce": (0, "all_reduce"),
    "_c10d_functional.all_gather_into_tensor": (0, "all_gather"),
    "_c10d_functional.reduce_scatter_tensor": (0, "reduce_scatter"),
    "_c10d_functional.broadcast": (0, "broadcast"),
}
NOT_COLLECTIVES = {"_c10d_functional.wait_tensor", "_c10d_functional._wrap_tensor_autograd"}


def ring_sent(kind: str, payload: int, world: int) -> float:
    """Bytes one process sends for a collective of ``payload`` input bytes (ring algorithm;
    broadcast: the payload, what the root sends down a chain)."""
    if kind == "all_reduce":
        return 2 * (world - 1) / world * payload
    if kind == "all_gather":
        return (world - 1) * payload
    if kind in ("reduce_scatter", "all_to_all"):
        return (world - 1) / world * payload
    return float(payload)


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class CollectiveBytes(TorchDispatchMode):
    """Tallies every collective dispatched while active: calls and payload bytes per kind;
    any other ``c10d`` op is listed in ``uncounted`` (the figures would miss it)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.payload: dict[str, int] = {}
        self.uncounted: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).rsplit(".", 1)[0]
        if name in COLLECTIVES:
            position, kind = COLLECTIVES[name]
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.payload[kind] = self.payload.get(kind, 0) + tensor_bytes(args[position])
        elif "c10d" in name and name not in NOT_COLLECTIVES:
            self.uncounted.append(name)
        return func(*args, **(kwargs or {}))

    def summary(self, world: int) -> dict:
        sent = sum(ring_sent(k, p, world) for k, p in self.payload.items())
        return {
            "calls": dict(self.calls),
            "payload": dict(self.payload),
            "payload_total": sum(self.payload.values()),
            "ring_sent_total": round(sent),
            "uncounted": sorted(set(self.uncounted)),
        }
