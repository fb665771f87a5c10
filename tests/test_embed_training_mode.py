"""``ZeroShotEvaluator.embed(..., training=True)``: the data as a training step sees it (train
mode, the training image transform), without touching the global random state."""

import torch

from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator
from glofnd_hf.models import build_tiny_hf_clip


def test_training_mode_embeddings_use_the_training_path_and_leave_the_rng_alone():
    data = load_digits_pairs(seed=0)["train"].select(range(12))
    adapter = build_tiny_hf_clip(seed=0, texts=list(data["caption"]))
    model = adapter.model
    model.eval()
    evaluator = ZeroShotEvaluator(data, show_progress=False)
    seen_train_flags, modes = [], []
    transform = adapter.image_transform

    def recording_transform(train: bool):
        seen_train_flags.append(train)
        inner = transform(train)

        def apply(image):
            modes.append(model.training)
            return inner(image)

        return apply

    adapter.image_transform = recording_transform
    rng = torch.get_rng_state()
    plain = evaluator.embed(adapter, model)
    drawn = evaluator.embed(adapter, model, training=True)
    assert seen_train_flags == [False, True]
    assert modes[: len(data)] == [False] * len(data) and modes[len(data) :] == [True] * len(data)
    assert not model.training  # restored
    assert torch.equal(torch.get_rng_state(), rng)  # the training run's draws are untouched
    # Draws from seeds are reproducible and differ from each other (augmentation).
    first = evaluator.embed(adapter, model, training=True, seed=1)
    again = evaluator.embed(adapter, model, training=True, seed=1)
    other = evaluator.embed(adapter, model, training=True, seed=2)
    assert torch.equal(first["images"], again["images"])
    assert not torch.equal(first["images"], other["images"])
    assert drawn["images"].shape == plain["images"].shape
    assert torch.allclose(drawn["images"].norm(dim=-1), torch.ones(len(data)), atol=1e-5)
