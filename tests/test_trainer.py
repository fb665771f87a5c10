"""GloFNDTrainer end to end on CPU with tiny models built offline."""

import math

import pytest
import torch
from callbacks import StopAfterEpoch
from cpu_args import cpu_args
from safetensors.torch import load_file

from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.models import build_tiny_hf_clip, build_tiny_open_clip, load_dual_encoder
from glofnd_hf.trainer import STATE_FILE, GloFNDTrainer


@pytest.fixture(scope="module")
def digits():
    return load_digits_pairs(seed=0)


def small_train(digits, n=48):
    return digits["train"].select(range(n))


def make_args(tmp_path, **overrides):
    defaults = dict(
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
        fn_alpha=0.05,
        detector="glofnd",
    )
    return cpu_args(tmp_path, **{**defaults, **overrides})


class RecordingTrainer(GloFNDTrainer):
    """Records the dataset indices that reach the loss (the loader prefetches ahead)."""

    seen: list

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.seen = getattr(self, "seen", []) + inputs["dataset_index"].tolist()
        return super().compute_loss(model, inputs, *args, **kwargs)


def adapter_for(family, digits):
    if family == "hf":
        return build_tiny_hf_clip(seed=0, texts=list(digits["train"]["caption"][:64]))
    return build_tiny_open_clip(seed=0)


@pytest.mark.parametrize("family", ["hf", "open_clip"])
def test_tiny_models_train_and_move_only_touched_thresholds(tmp_path, digits, family):
    adapter = adapter_for(family, digits)
    args = make_args(tmp_path, max_steps=3, num_samples=100, loss_type="clip")
    trainer = RecordingTrainer(adapter, args, train_dataset=small_train(digits))
    before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    state = trainer.contrastive_loss.state_dict()
    touched = torch.zeros(100, dtype=torch.bool)
    touched[trainer.seen] = True
    assert touched.sum() == 24
    for side in ("image", "text"):
        lam = state[f"detector.{side}.lambda"]
        assert torch.all(lam[touched] < 1.0), side
        assert torch.all(lam[~touched] == 1.0), side
        assert torch.all(state[f"detector.{side}.visits"][touched] == 1.0)
    changed = [n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 0.8 * len(before)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert "filtered_fraction_image" in logged[0] and "lambda_mean_image" in logged[0]


def test_global_loss_with_learnable_temperature_trains(tmp_path, digits):
    adapter = adapter_for("hf", digits)
    args = make_args(
        tmp_path,
        max_steps=2,
        loss_type="fastclip",
        temperature_lr=1e-2,
        temperature_init=0.07,
        gamma=0.5,
        gamma_schedule="constant",
    )
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits))
    scale = adapter.logit_scale_parameter()
    assert scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-5)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    groups = trainer.optimizer.param_groups
    temp_group = [g for g in groups if any(p is scale for p in g["params"])]
    assert len(temp_group) == 1 and temp_group[0]["weight_decay"] == 0.0
    assert temp_group[0]["initial_lr"] == pytest.approx(1e-2)
    assert scale.item() != pytest.approx(math.log(1 / 0.07), rel=1e-7)
    u = trainer.contrastive_loss.state_dict()["image.u"]
    assert (u > 0).sum() == 16


def test_logit_scale_is_clamped_and_not_weight_decayed(tmp_path, digits):
    adapter = adapter_for("hf", digits)
    args = make_args(
        tmp_path,
        max_steps=1,
        learning_rate=10.0,
        weight_decay=0.5,
        detector="none",
        max_logit_scale=20.0,
    )
    with torch.no_grad():
        adapter.logit_scale_parameter().fill_(math.log(19.9))
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits, 16))
    decay = set(trainer.get_decay_parameter_names(adapter.model))
    assert "logit_scale" not in decay and len(decay) > 0
    trainer.train()
    assert adapter.logit_scale_parameter().item() <= math.log(20.0) + 1e-6


def test_default_cap_keeps_a_checkpoints_higher_scale(tmp_path, digits, caplog):
    """A SigLIP checkpoint's learned scale (about 110) is above CLIP's cap of 100: by default
    it is kept; a max_logit_scale set below it cuts it and says so."""
    start = math.log(112.0)
    adapter = adapter_for("hf", digits)
    with torch.no_grad():
        adapter.logit_scale_parameter().fill_(start)
    args = make_args(tmp_path / "default", max_steps=1, learning_rate=1e-6, detector="none")
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits, 16))
    assert adapter.logit_scale_parameter().item() == pytest.approx(start)
    trainer.train()
    assert adapter.logit_scale_parameter().item() == pytest.approx(start, abs=1e-4)

    adapter = adapter_for("hf", digits)
    with torch.no_grad():
        adapter.logit_scale_parameter().fill_(start)
    args = make_args(tmp_path / "set", max_steps=1, detector="none", max_logit_scale=100.0)
    with caplog.at_level("WARNING", logger="glofnd_hf.trainer"):
        GloFNDTrainer(adapter, args, train_dataset=small_train(digits, 16))
    assert adapter.logit_scale_parameter().item() == pytest.approx(math.log(100.0))
    assert "above max_logit_scale 100" in caplog.text


def test_fixed_temperature_is_frozen(tmp_path, digits):
    adapter = adapter_for("hf", digits)
    args = make_args(
        tmp_path, max_steps=2, temperature_scheme="fixed", temperature_init=0.1, loss_type="sogclr"
    )
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits, 16))
    trainer.train()
    assert adapter.logit_scale_parameter().item() == pytest.approx(math.log(10.0), rel=1e-6)


def test_resume_gives_the_same_state_and_weights(tmp_path, digits):
    data = small_train(digits, 32)

    def run(out, stop_after=None, resume=None):
        adapter = adapter_for("hf", digits)
        args = make_args(
            tmp_path,
            output_dir=str(out),
            num_train_epochs=2,
            save_strategy="epoch",
            loss_type="fastclip",
            detector_kwargs={"init_quantile": True},
            gamma=0.5,
            gamma_schedule="cosine",
            gamma_decay_epochs=2,
        )
        callbacks = [StopAfterEpoch(stop_after)] if stop_after else None
        trainer = GloFNDTrainer(adapter, args, train_dataset=data, callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, adapter

    straight, straight_adapter = run(tmp_path / "straight")
    first, _ = run(tmp_path / "split", stop_after=1)
    checkpoint = tmp_path / "split" / "checkpoint-4"
    assert (checkpoint / STATE_FILE).exists()
    saved = load_file(checkpoint / STATE_FILE)
    for key, value in first.contrastive_loss.state_dict().items():
        assert torch.equal(saved[key], value), key
    resumed, resumed_adapter = run(tmp_path / "split", resume=str(checkpoint))
    a, b = straight.contrastive_loss.state_dict(), resumed.contrastive_loss.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["detector.image.lambda"], torch.ones_like(a["detector.image.lambda"]))
    for (name, p), q in zip(
        straight_adapter.model.named_parameters(), resumed_adapter.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("family", ["hf", "open_clip"])
def test_saved_model_reloads_with_the_same_embeddings(tmp_path, digits, family):
    adapter = adapter_for(family, digits)
    args = make_args(tmp_path, max_steps=1)
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits, 16))
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert not (out / STATE_FILE).exists()
    reloaded = load_dual_encoder(str(out))
    assert reloaded.family == family
    rows = digits["validation"].select(range(4))
    transform = adapter.image_transform(train=False)
    pixels = torch.stack([transform(im) for im in rows["image"]])
    adapter.model.eval()
    with torch.no_grad():
        for got, want in [
            (
                reloaded.encode_images(reloaded.model, pixels),
                adapter.encode_images(adapter.model, pixels),
            ),
            (
                reloaded.encode_texts(reloaded.model, rows["caption"]),
                adapter.encode_texts(adapter.model, rows["caption"]),
            ),
        ]:
            assert torch.allclose(got, want, atol=1e-5)


def test_start_up_errors_say_what_to_fix(tmp_path, digits):
    adapter = adapter_for("hf", digits)
    data = small_train(digits, 16)
    with pytest.raises(ValueError, match="no caption column 'text'"):
        GloFNDTrainer(adapter, make_args(tmp_path), train_dataset=data, caption_column="text")
    with pytest.raises(ValueError, match="no image column"):
        GloFNDTrainer(adapter, make_args(tmp_path), train_dataset=data, image_column="img")
    dup = data.remove_columns("dataset_index").add_column("dataset_index", [0, 1] * 8)
    with pytest.raises(ValueError, match="duplicates"):
        GloFNDTrainer(adapter, make_args(tmp_path), train_dataset=dup)
    neg = data.remove_columns("dataset_index").add_column("dataset_index", list(range(-1, 15)))
    with pytest.raises(ValueError, match="negative"):
        GloFNDTrainer(adapter, make_args(tmp_path), train_dataset=neg)
    with pytest.raises(ValueError, match="num_samples=10 is too small"):
        GloFNDTrainer(adapter, make_args(tmp_path, num_samples=10), train_dataset=data)
    with pytest.raises(ValueError, match="label column"):
        GloFNDTrainer(adapter, make_args(tmp_path, detector="oracle"), train_dataset=data)
    with pytest.raises(ValueError, match="unknown detector"):
        make_args(tmp_path, detector="magic")
    with pytest.raises(ValueError, match="sogclr"):
        make_args(tmp_path, loss_type="sogclr")


def test_corrupt_images_and_missing_captions_are_skipped_and_counted(tmp_path, digits):
    import datasets

    data = small_train(digits, 16).cast_column("image", datasets.Image(decode=False))
    rows = data.to_list()
    rows[3]["image"] = {"bytes": b"definitely not an image", "path": None}
    rows[9]["caption"] = ""
    broken = datasets.Dataset.from_list(rows, features=data.features)
    adapter = adapter_for("hf", digits)
    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=8, num_samples=16)
    trainer = RecordingTrainer(adapter, args, train_dataset=broken)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert trainer.bad_sample_counts() == {"corrupt_image": 1, "missing_caption": 1}
    # The bad rows were replaced by copies of good rows of their batch, never used themselves.
    assert 3 not in trainer.seen and 9 not in trainer.seen and len(trainer.seen) == 16
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[-1]["bad_samples_corrupt_image"] == 1


def test_ifnd_trains_through_the_trainer_with_its_options(tmp_path, digits):
    adapter = adapter_for("hf", digits)
    args = make_args(
        tmp_path,
        num_train_epochs=3,
        detector="ifnd",
        fn_alpha=0.1,
        fn_start_epoch=1,
        detector_kwargs={
            "num_clusters": [4, 8],
            "cluster_every": 1.0,
            "accept_warmup_epochs": 1.0,
            "kmeans_iters": 20,
        },
    )
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits, 32))
    detector = trainer.contrastive_loss.detector
    assert detector.name == "ifnd" and detector.config.num_clusters == (4, 8)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    state = trainer.contrastive_loss.state_dict()
    assert any(key.startswith("detector.") for key in state)
    # The bank saw every training pair through the loss's observe hook.
    assert bool(detector.seen[:32].all())


def test_tracking_health_is_logged_once_per_epoch(tmp_path, digits):
    adapter = adapter_for("hf", digits)
    args = make_args(tmp_path, num_train_epochs=2, loss_type="clip", fn_alpha=0.1)
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits))
    trainer.train()
    health = [e for e in trainer.state.log_history if "tracking_at_bound_image" in e]
    assert [round(e["epoch"]) for e in health] == [1, 2]
    for entry in health:
        for side in ("image", "text"):
            assert 0.0 <= entry[f"tracking_at_bound_{side}"] <= 1.0
    # The filtered share is read with the thresholds before each step: the first epoch
    # holds first visits only, so its figure is absent; the second has one.
    assert "tracking_filtered_over_alpha_image" not in health[0]
    for side in ("image", "text"):
        assert health[1][f"tracking_filtered_over_alpha_{side}"] > 0.0


@pytest.mark.parametrize("loss_type", ["clip", "fastclip"])
def test_eval_loss_is_the_training_objective_and_leaves_the_state(tmp_path, digits, loss_type):
    adapter = adapter_for("hf", digits)
    args = make_args(tmp_path, max_steps=2, loss_type=loss_type, per_device_eval_batch_size=8)
    trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits, 16))
    trainer.train()
    state = {k: v.clone() for k, v in trainer.contrastive_loss.state_dict().items()}
    # Eval rows carry indices of another split, beyond the training N = 16.
    held_out = digits["validation"].select(range(16))
    metrics = trainer.evaluate(eval_dataset=held_out)
    after = trainer.contrastive_loss.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items()), "eval moved the state"

    # The same objective computed by hand on the two eval batches.
    batches = trainer.get_eval_dataloader(held_out)
    losses = []
    with torch.no_grad():
        for inputs in batches:
            inputs = trainer._prepare_inputs(inputs)
            inputs.pop("dataset_index")
            out = adapter(
                trainer.model,
                {k: v for k, v in inputs.items() if k not in ("fn_labels", "bad_sample_counts")},
            )
            img = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)
            logits = out.logit_scale.double() * (img @ txt.t())
            if loss_type == "clip":
                target = torch.arange(len(img))
                loss = (
                    torch.nn.functional.cross_entropy(logits, target)
                    + torch.nn.functional.cross_entropy(logits.t(), target)
                ) / 2
            else:  # tau * (mean log g + rho), g over the other samples of the batch
                off = ~torch.eye(len(img), dtype=torch.bool)
                g = [
                    torch.where(off, torch.exp(side - side.diag().unsqueeze(1)), 0).sum(1)
                    / off.sum(1)
                    for side in (logits, logits.t())
                ]
                loss = (torch.log(torch.stack(g)).mean() + args.rho) / out.logit_scale.double()
            losses.append(loss.item())
    assert metrics["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_a_new_loss_is_its_module_and_one_registration(tmp_path, digits):
    """A loss known only by its class and one ``register(LossSpec(...))``: the arguments
    accept its name, the trainer builds and trains it, the model card describes it from
    its registration, and an unknown name lists the registered ones."""
    import torch.nn.functional as F

    from glofnd_hf.losses import BimodalContrastiveLoss, LossOutput, LossSpec, registry
    from glofnd_hf.model_card.descriptions import citations_for, describe_objective

    class MarginLoss(BimodalContrastiveLoss):
        """Hinge on the margin between each anchor's positive and its kept negatives."""

        def _loss(self, sim, logit_scale, masks, epoch):
            positive = sim.gather(-1, masks.positive_column.view(1, -1, 1).expand(2, -1, 1))
            kept = masks.kept_negatives(self.strategy)
            hinge = F.relu(0.2 - positive + sim).masked_fill(~kept, 0.0)
            per_anchor = hinge.sum(-1) / kept.sum(-1).clamp(min=1)
            return LossOutput(per_anchor.mean(), {"loss_image": per_anchor[0].mean().detach()})

    spec = LossSpec(
        name="margin",
        description="a hinge on the positive's margin (a test's toy)",
        objective="a margin loss",
        factory=lambda detector, settings, where: MarginLoss(detector, settings.fn_strategy),
    )
    registry.register(spec)
    try:
        with pytest.raises(ValueError, match="choose from .*margin"):
            make_args(tmp_path, loss_type="nowhere")
        args = make_args(tmp_path, loss_type="margin", max_steps=3, learning_rate=1e-2)
        adapter = adapter_for("hf", digits)
        before = [p.detach().clone() for p in adapter.model.parameters()]
        trainer = GloFNDTrainer(adapter, args, train_dataset=small_train(digits))
        assert isinstance(trainer.contrastive_loss, MarginLoss)
        result = trainer.train()
        assert math.isfinite(result.training_loss) and result.training_loss > 0
        moved = any(
            not torch.equal(a, b) for a, b in zip(before, adapter.model.parameters(), strict=True)
        )
        assert moved
        assert describe_objective("margin") == "a margin loss"
        assert len(citations_for("margin", "glofnd", True)) == 2  # GloFND and CLIP only
    finally:
        registry.unregister("margin")
