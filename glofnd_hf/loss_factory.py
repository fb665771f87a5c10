"""The contrastive loss (with its detector) that the training arguments describe, and where
its per-sample state lives. The one place that turns settings into a loss: the trainer,
the benchmarks and the tests build losses through it."""

from __future__ import annotations

import torch

from .args import AUTO_DEVICE_STATE_LIMIT_BYTES, GloFNDTrainingArguments
from .losses import BimodalContrastiveLoss
from .losses import registry as loss_registry
from .losses.registry import LossBuild
from .state_budget import check_state_fits

__all__ = ["build_contrastive_loss", "resolve_state_device"]


def build_contrastive_loss(
    args: GloFNDTrainingArguments,
    num_samples: int,
    device: torch.device | str,
    embed_width: int | None = None,
) -> BimodalContrastiveLoss:
    """The loss (with its detector) described by the training arguments; ``embed_width``:
    the model's embedding width, which sizes a state that stores embeddings (IFND's bank)."""
    state_device = resolve_state_device(args, num_samples, device, embed_width)
    rows = args.state_rows_per_process(num_samples)
    check_state_fits(rows, args.state_bytes_per_sample(embed_width), state_device)
    pin = state_device.type == "cpu" and torch.device(device).type == "cuda"
    detector = args.detector_spec().build(
        args.detector_settings(),
        args.shared_detector_settings(),
        num_samples=num_samples,
        device=state_device,
        pin_memory=pin,
        sharding=args.state_sharding,
    )
    where = LossBuild(
        num_samples, device=state_device, pin_memory=pin, sharding=args.state_sharding
    )
    return loss_registry.get(args.loss_type).build(detector, args, where)


def resolve_state_device(
    args: GloFNDTrainingArguments,
    num_samples: int,
    device: torch.device | str,
    embed_width: int | None = None,
) -> torch.device:
    """``state_device``: the CPU, the training device, or (auto) the device while the state
    is at most ``AUTO_DEVICE_STATE_LIMIT_BYTES``, else the CPU."""
    if args.state_device == "cpu":
        return torch.device("cpu")
    if args.state_device == "device":
        return torch.device(device)
    rows = args.state_rows_per_process(num_samples)
    if rows * args.state_bytes_per_sample(embed_width) <= AUTO_DEVICE_STATE_LIMIT_BYTES:
        return torch.device(device)
    return torch.device("cpu")
