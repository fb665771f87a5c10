"""Training settings: the detector registry, detector_kwargs, deprecated names, --help and the
generated settings reference."""

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cpu_args import cpu_args

from glofnd_hf.args import (
    RENAMED_SETTINGS,
    DataArguments,
    GloFNDTrainingArguments,
    ModelArguments,
)
from glofnd_hf.cli.config import REGENERATE_COMMAND, own_fields, sections, settings_reference
from glofnd_hf.cli.train import run
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.fnd import Detection, FalseNegativeDetector, registry
from glofnd_hf.fnd.registry import DetectorSpec
from glofnd_hf.fnd.setting_types import setting
from glofnd_hf.losses import GlobalContrastiveLoss
from glofnd_hf.models import build_tiny_hf_clip
from glofnd_hf.trainer import GloFNDTrainer

SETTINGS_DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


# -- a detector defined here, known to the package by one registration -----------------------
@dataclass
class FixedThresholdSettings:
    threshold: float = setting(0.9, "Negatives more similar than this are false negatives.")


class FixedThresholdDetector(FalseNegativeDetector):
    name = "fixed_threshold"

    def __init__(self, threshold: float, mask_start_epoch: float = 0.0) -> None:
        super().__init__(mask_start_epoch)
        self.threshold = threshold

    def detect(self, sim, batch):
        if not self.masking(batch.epoch):
            return Detection(None)
        return Detection((sim > self.threshold) & batch.negatives)


FIXED_THRESHOLD = DetectorSpec(
    name="fixed_threshold",
    description="negatives above a fixed similarity are false negatives",
    detector_class=FixedThresholdDetector,
    factory=lambda settings, shared, **_: FixedThresholdDetector(
        settings.threshold, shared.mask_start_epoch
    ),
    settings=FixedThresholdSettings,
)


@pytest.fixture
def fixed_threshold():
    registry.register(FIXED_THRESHOLD)
    yield FIXED_THRESHOLD
    registry.unregister(FIXED_THRESHOLD.name)


def make_args(tmp_path, **overrides):
    return cpu_args(tmp_path, **overrides)


def test_a_registered_detector_is_accepted_listed_and_trained(tmp_path, fixed_threshold, capsys):
    with pytest.raises(ValueError, match="unknown detector 'nope'.*fixed_threshold"):
        make_args(tmp_path, detector="nope")
    with pytest.raises(ValueError, match="unknown setting 'treshold'.*: threshold"):
        make_args(tmp_path, detector="fixed_threshold", detector_kwargs={"treshold": 0.5})

    with pytest.raises(SystemExit):
        run(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "fixed_threshold: negatives above a fixed similarity are false negatives" in shown
    assert "fixed_threshold: threshold" in shown

    # Every negative above -1: every anchor falls back to its unfiltered row.
    args = make_args(
        tmp_path,
        detector="fixed_threshold",
        detector_kwargs={"threshold": -1.0},
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
    )
    digits = load_digits_pairs(seed=0)["train"].select(range(16))
    adapter = build_tiny_hf_clip(seed=0, texts=list(digits["caption"]))
    trainer = GloFNDTrainer(adapter, args, train_dataset=digits)
    detector = trainer.contrastive_loss.detector
    assert isinstance(detector, FixedThresholdDetector) and detector.threshold == -1.0
    assert math.isfinite(trainer.train().training_loss)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["all_filtered_anchors_image"] for h in logged] == [8.0, 8.0]


def test_a_registered_detector_reaches_the_card_and_the_eval_report(tmp_path, fixed_threshold):
    from glofnd_hf.eval.run import evaluate, format_report
    from glofnd_hf.model_card import write_model_card

    out = tmp_path / "model"
    args = make_args(
        tmp_path,
        output_dir=str(out),
        detector="fixed_threshold",
        detector_kwargs={"threshold": 0.5},
        per_device_train_batch_size=8,
        max_steps=1,
    )
    digits = load_digits_pairs(seed=0)
    adapter = build_tiny_hf_clip(
        seed=0, texts=list(digits["train"]["caption"]) + list(digits["validation"]["caption"])
    )
    trainer = GloFNDTrainer(adapter, args, train_dataset=digits["train"].select(range(16)))
    trainer.train()
    trainer.save_model(str(out))
    write_model_card(trainer, out)

    card = (out / "README.md").read_text()
    assert FIXED_THRESHOLD.description in card
    assert "| `detector_kwargs.threshold` | `0.5` | `0.9` |" in card
    report = evaluate(
        str(out), dataset="glofnd-digits", max_samples=16, batch_size=16, show_progress=False
    )
    training = report["training"]
    assert training["detector"] == "fixed_threshold"
    assert FIXED_THRESHOLD.description in training["detector_description"]
    assert FIXED_THRESHOLD.description in format_report(report)


def test_state_bytes_come_from_the_registry(tmp_path):
    per_rule = {"pinball": 72, "tail": 64, "adam": 32}
    for rule, size in per_rule.items():
        args = make_args(tmp_path, detector_kwargs={"update_rule": rule})
        assert args.state_bytes_per_sample() == size
        assert (
            make_args(
                tmp_path, detector_kwargs={"update_rule": rule}, loss_type="fastclip"
            ).state_bytes_per_sample()
            == size + 8
        )
    assert make_args(tmp_path, detector="none").state_bytes_per_sample() == 0
    ifnd = make_args(tmp_path, detector="ifnd", detector_kwargs={"bank_dtype": "float32"})
    half = make_args(tmp_path, detector="ifnd")
    assert ifnd.state_bytes_per_sample() - half.state_bytes_per_sample() == 2 * 1024


def test_every_ifnd_setting_reaches_the_detector(tmp_path):
    args = make_args(
        tmp_path,
        detector="ifnd",
        fn_alpha=0.1,
        fn_start_epoch=2,
        seed=7,
        detector_kwargs={
            "num_clusters": [4, 8],
            "combine": "any",
            "kmeans_iters": 5,
            "bank_dtype": "float32",
            "kmeans": "torch",
            "rank_bins": 128,
        },
    )
    spec = args.detector_spec()
    assert len(spec.setting_names()) == 18
    detector = spec.build(args.detector_settings(), args.shared_detector_settings(), num_samples=20)
    assert detector.num_clusters == (4, 8) and detector.config.combine == "any"
    assert detector.config.kmeans_iters == 5 and detector.dtype == torch.float32
    assert detector.kmeans == "torch" and detector.config.rank_bins == 128
    assert detector.start_epoch == 2.0 and detector.seed == 7  # shared start, training seed


def test_labels_need_comes_from_the_detector_class():
    assert registry.get("oracle").requires_labels
    assert not any(registry.get(n).requires_labels for n in ("none", "glofnd", "ifnd"))


def test_detector_kwargs_from_a_flag_and_shared_keys_refused(tmp_path):
    args = make_args(tmp_path, detector_kwargs='{"update_rule": "adam", "lr": 0.01}')
    assert args.detector_kwargs == {"update_rule": "adam", "lr": 0.01}
    assert args.detector_settings().lr == 0.01
    with pytest.raises(ValueError, match="'alpha' is a setting shared by every detector"):
        make_args(tmp_path, detector_kwargs={"alpha": 0.1})


def test_deprecated_names_warn_and_move_to_their_new_place(tmp_path):
    with pytest.warns(FutureWarning) as caught:
        args = make_args(
            tmp_path,
            glofnd_alpha=0.05,
            glofnd_mask_start_epoch=2,
            glofnd_update_start_epoch=1,
            glofnd_update_rule="adam",
            glofnd_lr=0.1,
            glofnd_beta2=0.99,
            glofnd_init_quantile=True,
        )
    messages = " ".join(str(w.message) for w in caught)
    for old, new in (
        ("glofnd_alpha", "use fn_alpha"),
        ("glofnd_mask_start_epoch", "use fn_start_epoch"),
        ("glofnd_lr", "detector_kwargs: {lr: ...}"),
    ):
        assert old in messages and new in messages
    assert args.fn_alpha == 0.05 and args.fn_start_epoch == 2 and args.glofnd_alpha is None
    config = args.detector_settings()
    assert (config.alpha, config.mask_start_epoch, config.update_start_epoch) == (0.05, 2, 1)
    assert (config.update_rule, config.lr, config.betas) == ("adam", 0.1, (0.9, 0.99))
    assert config.init_quantile

    with pytest.warns(FutureWarning, match="no effect with detector 'glofnd'"):
        args = make_args(tmp_path, ifnd_cluster_every=2.0)
    assert args.detector_kwargs == {}
    with pytest.warns(FutureWarning, match="ifnd_num_clusters"):
        args = make_args(tmp_path, detector="ifnd", ifnd_num_clusters=[4, 8])
    assert args.detector_settings().num_clusters == (4, 8)
    with pytest.raises(ValueError, match="contradicts"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        make_args(tmp_path, glofnd_lr=0.1, detector_kwargs={"lr": 0.2})


def test_deprecated_and_new_name_together_agree_or_stop(tmp_path):
    # Issue 32: the deprecated name used to win silently over the new one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ValueError, match="glofnd_alpha=0.02 contradicts fn_alpha=0.01"):
            make_args(tmp_path, fn_alpha=0.01, glofnd_alpha=0.02)
        assert make_args(tmp_path, fn_alpha=0.02, glofnd_alpha=0.02).fn_alpha == 0.02
        with pytest.raises(ValueError, match="contradicts fn_start_epoch"):
            make_args(tmp_path, fn_start_epoch=3.0, glofnd_mask_start_epoch=1.0)
        with pytest.raises(ValueError, match="contradicts detector_kwargs betas"):
            make_args(tmp_path, glofnd_beta1=0.5, detector_kwargs={"betas": [0.8, 0.999]})
        agreeing = make_args(tmp_path, glofnd_beta1=0.8, detector_kwargs={"betas": [0.8, 0.99]})
        assert agreeing.detector_settings().betas == (0.8, 0.99)


def test_deprecated_and_new_name_on_the_command_line(tmp_path, capsys):
    from glofnd_hf.cli.train import main

    argv = ["recipes/demo.yaml", "--output_dir", str(tmp_path), "--fn_alpha", "0.01"]
    with pytest.raises(SystemExit) as stop, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        main([*argv, "--glofnd_alpha", "0.02"])
    assert stop.value.code == 2
    assert "glofnd_alpha=0.02 contradicts fn_alpha=0.01" in capsys.readouterr().err


def test_every_renamed_setting_is_a_deprecated_field():
    fields = {f.name: f for f in dataclasses.fields(GloFNDTrainingArguments)}
    for renamed in RENAMED_SETTINGS:
        assert fields[renamed.old].default is None
        assert fields[renamed.old].metadata["help"].startswith("Deprecated: use")
        if renamed.detector is None:
            assert renamed.new in fields
        else:
            assert renamed.new in registry.get(renamed.detector).setting_names()


def test_one_temperature_vocabulary(tmp_path):
    with pytest.warns(FutureWarning, match="now called 'learnable'"):
        args = make_args(tmp_path, temperature_scheme="global_learnable", loss_type="fastclip")
    assert args.temperature_scheme == "learnable"
    with pytest.warns(FutureWarning):
        loss = GlobalContrastiveLoss(4, temperature="global_learnable")
    assert loss.temperature == "learnable"
    with pytest.raises(ValueError, match="temperature must be one of"):
        GlobalContrastiveLoss(4, temperature="warm")


def test_every_setting_has_help_and_a_section():
    for dataclass_type in (ModelArguments, DataArguments, GloFNDTrainingArguments):
        own = own_fields(dataclass_type)
        missing = [f.name for f in own if not f.metadata.get("help")]
        assert not missing, f"{dataclass_type.__name__} fields without help: {missing}"
        assert set(dataclass_type.help_sections) <= {f.name for f in own}
        grouped = [f.name for _, fields in sections(dataclass_type) for f in fields]
        assert grouped == [f.name for f in own]
    for name in registry.names():
        for f in registry.get(name).setting_fields():
            assert f.metadata.get("help"), (name, f.name)


def test_help_shows_the_sections(capsys):
    with pytest.raises(SystemExit):
        run(["--help"])
    out = capsys.readouterr().out
    for title in (
        "Contrastive loss:",
        "False-negative detection:",
        "Per-sample state:",
        "Data (webdataset shards):",
    ):
        assert title in out
    assert "Deprecated: use fn_alpha." in " ".join(out.split())


def test_settings_doc_is_generated_from_the_metadata():
    generated = settings_reference()
    assert "| `fn_alpha` | `0.001` |" in generated and "### `ifnd`" in generated
    assert SETTINGS_DOC.read_text() == generated, (
        f"docs/settings.md is out of date: regenerate it with `{REGENERATE_COMMAND}`"
    )


def test_detector_kwargs_keyed_by_detector_apply_the_chosen_section(tmp_path):
    per_detector = {"glofnd": {"update_rule": "adam"}, "ifnd": {"num_clusters": [4]}}
    glofnd = make_args(tmp_path, detector_kwargs=per_detector)
    assert glofnd.detector_kwargs == {"update_rule": "adam"}
    assert glofnd.detector_settings().update_rule == "adam"
    ifnd = make_args(tmp_path, detector="ifnd", detector_kwargs=per_detector)
    assert ifnd.detector_settings().num_clusters == (4,) or list(
        ifnd.detector_settings().num_clusters
    ) == [4]
    assert make_args(tmp_path, detector="none", detector_kwargs=per_detector).detector_kwargs == {}
    # A typo in a section that is not chosen is still an error, named with its section.
    with pytest.raises(ValueError, match=r"detector_kwargs\.ifnd: unknown setting 'num_cluster'"):
        make_args(tmp_path, detector_kwargs={"glofnd": {}, "ifnd": {"num_cluster": [4]}})
