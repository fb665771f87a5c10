"""One-line answers to the smaller bad inputs of issue 32 (item 9): each stops before any
model or data loads, names the setting or file, and says what to do."""

from __future__ import annotations

import warnings

import pytest
import torch

from glofnd_hf.args import DataArguments
from glofnd_hf.cli import train as train_cli
from glofnd_hf.cli.errors import error_line


def _train_error(argv: list[str], capsys, monkeypatch) -> str:
    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the bad input was found")

    monkeypatch.setattr(train_cli, "build_adapter", no_model)
    monkeypatch.setattr(train_cli, "load_image_text_dataset", no_model)
    with pytest.raises(SystemExit) as stop, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glofnd-train: error: ")
    return err[0]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1"),
        (["--detector_kwargs", "{bad"], "detector_kwargs is not valid JSON"),
        (["--fn_alpha", "2"], "fn_alpha must lie in (0, 1), got 2.0"),
    ],
)
def test_bad_settings_are_named_before_anything_loads(
    flags, expected, tmp_path, capsys, monkeypatch
):
    line = _train_error(
        ["recipes/demo.yaml", "--output_dir", str(tmp_path / "out"), *flags], capsys, monkeypatch
    )
    assert expected in line


def test_a_folder_given_as_the_recipe(capsys, monkeypatch):
    line = _train_error(["recipes"], capsys, monkeypatch)
    assert "recipes is a folder, not a YAML recipe" in line and "demo.yaml" in line


@pytest.mark.parametrize("value", ["none", "None", ""])
def test_eval_split_none_means_no_evaluation(value):
    assert DataArguments(dataset_name="glofnd-digits", eval_split=value).eval_split is None
    assert DataArguments(eval_split="test").eval_split == "test"


class _Broken(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise ValueError(f"sample {i} has no caption\nsecond line of the message")


def test_a_dataloader_workers_error_is_one_short_line():
    loader = torch.utils.data.DataLoader(_Broken(), num_workers=1)
    with pytest.raises(ValueError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # what torch re-raises
    line = error_line("glofnd-train", caught.value)
    assert line == (
        "glofnd-train: error: sample 0 has no caption second line of the message "
        "(in a DataLoader worker) [--debug shows the traceback]"
    )
    plain = error_line("glofnd-train", ValueError("plain: message"))
    assert plain == "glofnd-train: error: plain: message [--debug shows the traceback]"


def test_a_state_too_big_for_memory_is_refused_before_anything_loads(tmp_path, capsys, monkeypatch):
    line = _train_error(
        ["recipes/demo.yaml", "--output_dir", str(tmp_path), "--num_samples", "100000000000"],
        capsys,
        monkeypatch,
    )
    assert "the per-sample state needs 6,705.5 GiB (N = 100,000,000,000 samples x 72 bytes)" in (
        line
    )


def test_the_state_budget_against_a_given_memory():
    from glofnd_hf.state_budget import StateTooLargeError, check_state_fits

    check_state_fits(1000, 72, "cpu", memory=72_000)  # exactly fits
    with pytest.raises(StateTooLargeError, match="needs 0.0 GiB .* but this machine has"):
        check_state_fits(1001, 72, "cpu", memory=72_000)


def test_n_from_the_data_is_checked_when_the_loss_is_built(tmp_path, monkeypatch):
    from cpu_args import cpu_args

    from glofnd_hf import state_budget
    from glofnd_hf.trainer import build_contrastive_loss

    monkeypatch.setattr(state_budget, "memory_of", lambda device: 10_000)
    args = cpu_args(tmp_path)
    with pytest.raises(state_budget.StateTooLargeError, match="N = 1,000 samples"):
        build_contrastive_loss(args, 1000, "cpu")
    assert build_contrastive_loss(args, 100, "cpu").num_samples == 100
