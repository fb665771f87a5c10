"""GloFNDTrainer on streaming webdataset shards: touched thresholds, mid-epoch resume."""

import math

import pytest
import torch
from callbacks import StopAt

from glofnd_hf.args import GloFNDTrainingArguments
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.data.shard_writer import write_shards_from_dataset
from glofnd_hf.data.shards import ShardConfig, build_shard_loader
from glofnd_hf.models import build_tiny_hf_clip
from glofnd_hf.trainer import GloFNDTrainer

N = 200  # index space larger than the data: indices 100..163 are used


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    rows = load_digits_pairs(seed=0)["train"].select(range(64))
    rows = rows.map(lambda r: {"dataset_index": r["dataset_index"] + 100})
    out = tmp_path_factory.mktemp("shards")
    pattern, count = write_shards_from_dataset(
        rows, str(out), index_column="dataset_index", samples_per_shard=16
    )
    assert count == 64
    return pattern, list(rows["caption"])


class Recording(GloFNDTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen = getattr(self, "seen", []) + inputs["dataset_index"].tolist()
        return super().compute_loss(model, inputs, *args, **kwargs)


def make(tmp_path, pattern, captions, out="out", num_workers=0, **overrides):
    adapter = build_tiny_hf_clip(seed=0, texts=captions)
    settings = dict(
        output_dir=str(tmp_path / out),
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        num_samples=N,
        fn_alpha=0.05,
        logging_steps=2,
        loss_type="fastclip",
        gamma=0.5,
    )
    settings.update(overrides)
    args = GloFNDTrainingArguments(**settings)
    loader = build_shard_loader(
        ShardConfig(
            shards=pattern,
            batch_size=8,
            dataset_size=N,
            num_workers=num_workers,
            shuffle_buffer=16,
            seed=0,
            rank=0,
            world_size=1,
        ),
        adapter.image_transform(train=False),
        adapter.tokenize,
    )
    return adapter, args, loader


def test_training_from_shards_updates_exactly_the_seen_thresholds(tmp_path, shards):
    pattern, captions = shards
    adapter, args, loader = make(tmp_path, pattern, captions, max_steps=5)
    trainer = Recording(adapter, args, train_dataset=loader)
    assert trainer.get_train_dataloader() is loader  # never re-wrapped by accelerate
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    seen = torch.tensor(trainer.seen)
    assert len(seen) == 40 and seen.min() >= 100 and seen.max() < 164
    state = trainer.contrastive_loss.state_dict()
    touched = torch.zeros(N, dtype=torch.bool)
    touched[seen] = True
    for side in ("image", "text"):
        lam = state[f"detector.{side}.lambda"]
        assert torch.all(lam[touched] < 1.0) and torch.all(lam[~touched] == 1.0)
        u = state[f"{side}.u"]
        assert torch.all(u[touched] > 0) and torch.all(u[~touched] == 0)
    # Epoch for start epochs and schedules: passes over the shards' samples (64 here), not
    # samples seen / N (the index space, 200, is larger than the data).
    assert loader.batches_per_epoch == 8
    assert trainer.current_epoch() == pytest.approx(5 / 8)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all("bad_samples_corrupt_image" in h for h in logged)


def test_mid_epoch_resume_continues_the_same_stream(tmp_path, shards):
    pattern, captions = shards
    adapter, args, loader = make(tmp_path, pattern, captions, out="straight")
    straight = Recording(adapter, args, train_dataset=loader)
    straight.train()

    adapter1, args1, loader1 = make(
        tmp_path, pattern, captions, out="split", save_steps=3, save_strategy="steps"
    )
    first = Recording(adapter1, args1, train_dataset=loader1, callbacks=[StopAt(11)])
    first.train()
    checkpoint = tmp_path / "split" / "checkpoint-11"  # epoch 1, 3 batches into it
    assert checkpoint.exists()
    adapter2, args2, loader2 = make(tmp_path, pattern, captions, out="split")
    resumed = Recording(adapter2, args2, train_dataset=loader2)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert first.seen + resumed.seen == straight.seen  # same shard order, nothing repeated
    assert (checkpoint / "shard_stream.json").is_file()
    a, b = straight.contrastive_loss.state_dict(), resumed.contrastive_loss.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for (name, p), q in zip(
        adapter.model.named_parameters(), adapter2.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name


def test_a_mid_epoch_resume_under_another_worker_count_is_refused(tmp_path, shards):
    from glofnd_hf.data.errors import ShardResumeError

    pattern, captions = shards
    adapter1, args1, loader1 = make(
        tmp_path, pattern, captions, out="run", save_steps=3, save_strategy="steps", max_steps=3
    )
    Recording(adapter1, args1, train_dataset=loader1).train()
    checkpoint = tmp_path / "run" / "checkpoint-3"  # epoch 0, 3 of 8 batches done
    adapter2, args2, loader2 = make(tmp_path, pattern, captions, out="run", num_workers=2)
    resumed = Recording(adapter2, args2, train_dataset=loader2)
    with pytest.raises(ShardResumeError, match="dataloader_num_workers = 1 and this run has 2"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
