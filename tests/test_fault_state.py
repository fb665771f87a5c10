"""Fault injection into stored per-sample state (issue 14, item 3): every bad file or entry is
refused with a message naming the file and the first bad entry, and nothing is changed."""

import hashlib

import pytest
import torch
from cpu_args import cpu_args
from safetensors.torch import save_file

from glofnd_hf.fnd import GloFNDConfig, StateError
from glofnd_hf.fnd.detectors import GloFNDDetector
from glofnd_hf.fnd.ifnd import IFNDDetector
from glofnd_hf.fnd.ifnd_config import IFNDConfig
from glofnd_hf.losses import GlobalContrastiveLoss
from glofnd_hf.state_file import StateFileError, load_state_file

N = 12


def make_loss(rule="tail"):
    return GlobalContrastiveLoss(N, GloFNDDetector(N, GloFNDConfig(update_rule=rule)))


def trained_state(rule):
    """A state that moved: a few steps of the loss on random embeddings."""
    loss = make_loss(rule)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        image = torch.nn.functional.normalize(torch.randn(N, 8, generator=gen), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(N, 8, generator=gen), dim=-1)
        loss(image, text, torch.tensor(20.0), torch.arange(N), epoch=float(step))
    return {k: v.clone() for k, v in loss.state_dict().items()}


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put(key, position, value):
    def change(state):
        state[key][position] = value

    return change


def replace(key, value):
    def change(state):
        state[key] = value(state[key])

    return change


CASES = [
    # rule, corruption, message after the file name
    (
        "tail",
        replace("detector.image.lambda", lambda t: t.to(torch.int32)),
        "state entry 'detector.image.lambda': has dtype int32, expected float32",
    ),
    (
        "tail",
        put("detector.text.lambda", 3, float("nan")),
        "state entry 'detector.text.lambda': sample 3 holds nan, expected a finite number "
        "in [-1, 1] (1 invalid entry)",
    ),
    (
        "tail",
        put("detector.image.lambda", 5, 7.0),
        "state entry 'detector.image.lambda': sample 5 holds 7.0, expected a finite number "
        "in [-1, 1] (1 invalid entry)",
    ),
    (
        "tail",
        put("detector.image.scale", 2, float("inf")),
        "state entry 'detector.image.scale': sample 2 holds inf, expected a finite number >= 0",
    ),
    (
        "tail",
        put("detector.image.visits", 4, -5.0),
        "state entry 'detector.image.visits': sample 4 holds -5.0, expected an integer >= 0",
    ),
    (
        "adam",
        put("detector.text.visits", 0, 1.5),
        "state entry 'detector.text.visits': sample 0 holds 1.5, expected an integer >= 0",
    ),
    (
        "adam",
        put("detector.image.exp_avg_sq", 7, -1e-4),
        "state entry 'detector.image.exp_avg_sq': sample 7 holds -9.999999747378752e-05, "
        "expected a finite number >= 0",
    ),
    (
        "adam",
        put("text.u", 9, -1.0),
        "state entry 'text.u': sample 9 holds -1.0, expected a finite number >= 0",
    ),
    (
        "tail",
        replace("image.u", lambda t: torch.cat([t, t[:1]])),
        f"state entry 'image.u': has shape ({N + 1},), expected ({N},): was it saved for a "
        "data set of another size?",
    ),
]


@pytest.mark.parametrize("rule, corrupt, message", CASES)
def test_bad_entries_are_refused_naming_file_and_entry(tmp_path, rule, corrupt, message):
    state = trained_state(rule)
    corrupt(state)
    path = tmp_path / "glofnd_state.safetensors"
    save_file(state, str(path), metadata={"num_samples": str(N)})
    before = digest(path)
    loss = make_loss(rule)
    fresh = {k: v.clone() for k, v in loss.state_dict().items()}
    with pytest.raises(StateFileError) as info:
        load_state_file(path, loss, N)
    assert str(info.value).startswith(f"{path}: {message}")
    # Nothing changed: neither the file nor any part of the in-memory state.
    assert digest(path) == before
    after = loss.state_dict()
    assert all(torch.equal(after[k].nan_to_num(), fresh[k].nan_to_num()) for k in fresh)


def test_truncated_empty_and_foreign_files_are_clear_errors(tmp_path):
    state = trained_state("tail")
    good = tmp_path / "good.safetensors"
    save_file(state, str(good), metadata={"num_samples": str(N)})
    data = good.read_bytes()
    loss = make_loss("tail")
    for name, content in [
        ("half", data[: len(data) // 2]),
        ("cut", data[:-1]),
        ("header", data[:50]),
        ("empty", b""),
    ]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(StateFileError) as info:
            load_state_file(path, loss, N)
        assert str(info.value).startswith(
            f"{path} is not a readable safetensors file (truncated or corrupt?): SafetensorError: "
        ), name
        assert path.read_bytes() == content
    # Written for another N: named from the metadata before any entry is read.
    with pytest.raises(StateFileError) as info:
        load_state_file(good, loss, N + 4)
    assert str(info.value) == (
        f"{good}: holds the state of N={N} samples, this run has N={N + 4} (another data set, "
        "or another num_samples?)"
    )
    load_state_file(good, loss, N)  # the intact file loads
    assert all(torch.equal(loss.state_dict()[k], state[k]) for k in state)


def ifnd_state():
    det = IFNDDetector(N, IFNDConfig(num_clusters=(3, 4), accept_warmup_epochs=0.0))
    gen = torch.Generator().manual_seed(1)
    for epoch in (0.0, 1.0, 1.5):
        image = torch.nn.functional.normalize(torch.randn(N, 8, generator=gen), dim=-1)
        det.observe(torch.arange(N), image, image)
        sim = torch.stack([image @ image.t()] * 2)
        negatives = ~torch.eye(N, dtype=torch.bool)
        from glofnd_hf.fnd.detectors import DetectionBatch

        det.detect(sim, DetectionBatch(torch.arange(N), torch.arange(N), negatives, epoch))
    assert det.rounds >= 1
    return det.state_dict()


@pytest.mark.parametrize(
    "key, change, message",
    [
        ("labels", lambda t: t.index_fill_(1, torch.tensor([2]), 3), "labels[0]"),
        ("confidence", lambda t: t.index_fill_(1, torch.tensor([1]), float("nan")), "confidence"),
        ("accept_rank", lambda t: t.index_fill_(1, torch.tensor([0]), 1.5), "accept_rank"),
        ("bank", lambda t: t.index_fill_(0, torch.tensor([4]), float("inf")), "bank"),
        ("seen", lambda t: t.to(torch.uint8), "seen"),
        ("rounds", lambda t: t.fill_(-1), "rounds"),
    ],
)
def test_ifnd_state_is_checked(key, change, message):
    state = ifnd_state()
    state[key] = change(state[key].clone())
    det = IFNDDetector(N, IFNDConfig(num_clusters=(3, 4), accept_warmup_epochs=0.0))
    with pytest.raises(StateError) as info:
        det.load_state_dict(state)
    assert str(info.value).startswith(f"state entry '{message}': ")
    expected = {
        "labels": "sample 2 holds 3, expected an integer in [-1, 2]",
        "confidence": "position [0, 1] holds nan, expected a finite number",
        "accept_rank": "position [0, 0] holds 1.5, expected a finite number in [0, 1]",
        "bank": "position [4, 0] holds inf, expected a finite number",
        "seen": "has dtype uint8, expected bool",
        "rounds": "it holds -1, expected an integer >= 0",
    }[key]
    assert expected in str(info.value)
    assert det.rounds == 0 and det.bank is None  # nothing was loaded


def test_trainer_refuses_a_corrupted_checkpoint_state_naming_the_file(tmp_path):
    from safetensors.torch import load_file

    from glofnd_hf.data.digits import load_digits_pairs
    from glofnd_hf.models import build_tiny_open_clip
    from glofnd_hf.trainer import STATE_FILE, GloFNDTrainer

    args = cpu_args(tmp_path, loss_type="sogclr", temperature_scheme="fixed")
    train = load_digits_pairs(seed=0)["train"].select(range(16))
    trainer = GloFNDTrainer(build_tiny_open_clip(seed=0), args, train_dataset=train)
    checkpoint = tmp_path / "checkpoint-2"
    trainer.save_fnd_state(str(checkpoint))
    path = checkpoint / STATE_FILE
    state = load_file(str(path))
    state["detector.image.visits"][3] = -5.0
    save_file(state, str(path), metadata={"num_samples": "16"})
    before = digest(path)
    fresh = {k: v.clone() for k, v in trainer.contrastive_loss.state_dict().items()}
    with pytest.raises(StateFileError) as info:
        trainer.load_fnd_state(str(checkpoint))  # what resume_from_checkpoint calls
    assert str(info.value) == (
        f"{path}: state entry 'detector.image.visits': sample 3 holds -5.0, expected an integer "
        ">= 0 (1 invalid entry)"
    )
    assert digest(path) == before
    after = trainer.contrastive_loss.state_dict()
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)
    path.write_bytes(path.read_bytes()[:100])  # a write cut short
    with pytest.raises(StateFileError, match="truncated or corrupt"):
        trainer.load_fnd_state(str(checkpoint))
