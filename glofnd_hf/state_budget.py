"""Refuse a per-sample state that cannot fit before it is allocated.

N comes from a setting or from the largest dataset index, so a typo (``num_samples`` with
three zeros too many) or one bad index would otherwise end in an allocator error of many
terabytes, after the model and the data have loaded."""

from __future__ import annotations

import torch

__all__ = ["StateTooLargeError", "check_state_fits", "memory_of"]

GIB = 2**30


class StateTooLargeError(ValueError):
    """The per-sample state needs more memory than the machine or the device has."""


def memory_of(device: torch.device) -> int:
    """Total memory of ``device`` in bytes (the host's physical memory for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    import psutil  # a dependency of accelerate

    return psutil.virtual_memory().total


def check_state_fits(
    num_samples: int, bytes_per_sample: int, device: torch.device | str, memory: int | None = None
) -> None:
    """Raise :class:`StateTooLargeError` when ``num_samples`` rows of ``bytes_per_sample``
    exceed the memory of ``device`` (``memory`` overrides the measured one)."""
    device = torch.device(device)
    needed = num_samples * bytes_per_sample
    available = memory_of(device) if memory is None else memory
    if needed <= available:
        return
    where = "the GPU" if device.type == "cuda" else "this machine"
    raise StateTooLargeError(
        f"the per-sample state needs {needed / GIB:,.1f} GiB (N = {num_samples:,} samples x "
        f"{bytes_per_sample} bytes) but {where} has {available / GIB:,.1f} GiB: check "
        f"num_samples and the largest dataset index (N is the largest index + 1)"
        + ("; state_device: cpu keeps it in host memory" if device.type == "cuda" else "")
    )
