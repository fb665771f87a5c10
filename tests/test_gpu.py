"""The method on CUDA: equal to the CPU, float32 threshold math under bf16 autocast, no host
sync in a step, pinned host state equal to device state. ``pytest -m gpu``; skipped without
CUDA (``benchmarks/gpu_check.py`` runs these first on a GPU machine)."""

from __future__ import annotations

import pytest
import torch

from glofnd_hf.fnd import registry
from glofnd_hf.fnd.registry import SharedSettings
from glofnd_hf.losses import ClipLoss, GammaSchedule, GlobalContrastiveLoss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N, B, D = 64, 16, 32
DETECTORS = {  # name -> (registry name, detector_kwargs)
    "none": ("none", {}),
    "glofnd-tail": ("glofnd", {"update_rule": "tail"}),
    "glofnd-adam": ("glofnd", {"update_rule": "adam"}),
    "batch_quantile": ("batch_quantile", {}),
    "oracle": ("oracle", {}),
}


def make_loss(kind: str, detector: str, strategy: str, device, state_device=None, pin=False):
    name, kwargs = DETECTORS[detector]
    state_device = device if state_device is None else state_device
    det = registry.get(name).build(
        kwargs,
        SharedSettings(alpha=0.1, mask_start_epoch=0.0),
        num_samples=N,
        device=state_device,
        pin_memory=pin,
    )
    if kind == "clip":
        return ClipLoss(det, strategy, check_inputs=False)
    return GlobalContrastiveLoss(
        N,
        det,
        strategy,
        gamma=GammaSchedule(0.5, "constant", 1.0),
        temperature="learnable",
        multiply_tau=True,
        device=state_device,
        pin_memory=pin,
        check_inputs=False,
    )


def batches(steps: int = 4):
    """Overlapping index sets (samples are revisited, so the state's update is exercised)."""
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        index = torch.randperm(N, generator=gen)[:B]
        image = torch.randn(B, D, generator=gen)
        text = image + 0.5 * torch.randn(B, D, generator=gen)
        yield step, index, image, text, index % 4


def run(loss, device, steps=4, autocast=False):
    """Losses, gradients and the state after each step."""
    out = []
    for step, index, image, text, labels in batches(steps):
        image = image.to(device).requires_grad_()
        text = text.to(device).requires_grad_()
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            result = loss(
                image, text, scale, index.to(device), epoch=float(step), labels=labels.to(device)
            )
        result.loss.backward()
        state = {k: v.detach().cpu().clone() for k, v in loss.state_dict().items()}
        out.append(
            (result.loss.detach().cpu(), image.grad.cpu(), text.grad.cpu(), scale.grad.cpu(), state)
        )
    return out


def assert_runs_equal(got, want, atol=1e-5):
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        for x, y in zip(a[:4], b[:4], strict=True):
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-5, msg=f"step {step}")
        assert a[4].keys() == b[4].keys()
        for key in a[4]:
            torch.testing.assert_close(
                a[4][key], b[4][key], atol=atol, rtol=1e-5, msg=f"step {step}: state {key}"
            )


@pytest.mark.parametrize("strategy", ["eliminate", "attract"])
@pytest.mark.parametrize("detector", list(DETECTORS))
@pytest.mark.parametrize("kind", ["clip", "global"])
def test_cuda_equals_cpu(kind, detector, strategy):
    cpu = run(make_loss(kind, detector, strategy, "cpu"), "cpu")
    cuda = run(make_loss(kind, detector, strategy, "cuda"), "cuda")
    assert_runs_equal(cuda, cpu)


@pytest.mark.parametrize("kind", ["clip", "global"])
def test_bf16_autocast_keeps_threshold_math_in_float32(kind):
    with_autocast = run(make_loss(kind, "glofnd-tail", "eliminate", "cuda"), "cuda", autocast=True)
    without = run(make_loss(kind, "glofnd-tail", "eliminate", "cuda"), "cuda")
    assert_runs_equal(with_autocast, without)
    for *_, state in with_autocast:
        assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize("kind", ["clip", "global"])
def test_pinned_host_state_equals_device_state(kind):
    host = make_loss(kind, "glofnd-tail", "eliminate", "cuda", state_device="cpu", pin=True)
    assert all(v.is_pinned() for v in host.state_dict().values())
    device = make_loss(kind, "glofnd-tail", "eliminate", "cuda")
    assert_runs_equal(run(host, "cuda"), run(device, "cuda"))


@pytest.mark.parametrize("detector", ["glofnd-tail", "glofnd-adam", "batch_quantile"])
@pytest.mark.parametrize("kind", ["clip", "global"])
def test_no_host_sync_inside_a_step(kind, detector):
    """With the state on the device and input checks off, a step never waits for the GPU."""
    loss = make_loss(kind, detector, "eliminate", "cuda")
    run(loss, "cuda", steps=1)  # first-call set-up (allocations, lazy init) outside the check
    inputs = [
        (step, index.cuda(), image.cuda().requires_grad_(), text.cuda().requires_grad_())
        for step, index, image, text, _ in batches(3)
    ][1:]
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, index, image, text in inputs:
            loss(image, text, scale, index, epoch=float(step)).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(scale.grad)
