"""Fault injection at the command lines (issue 14, items 5, 7 and 8): bad configuration values,
tokens in saved or uploaded files, Hub and network failures, non-empty output folders. Each
answer is one line on stderr and exit status 2, and nothing already written is changed."""

import hashlib
import os
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from cpu_args import cpu_args
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from test_hub import FakeHub
from test_shards import good_sample, write_tar

from glofnd_hf.cli import train as train_cli
from glofnd_hf.cli.eval import main as eval_main
from glofnd_hf.cli.push import main as push_main
from glofnd_hf.cli.shards import main as shards_main
from glofnd_hf.hub import save_for_hub
from glofnd_hf.models import build_tiny_hf_clip
from glofnd_hf.secret_args import find_secrets

DEBUG_HINT = " [--debug shows the traceback]\n"
TOKEN = "hf_glofndFaultInjectionToken0123456789"


def tree_digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line(err: str, prog: str) -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- item 5


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if glofnd-train gets as far as loading data or a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("data or model loaded before the configuration was checked")

    monkeypatch.setattr(train_cli, "load_image_text_dataset", refuse)
    monkeypatch.setattr(train_cli, "build_adapter", refuse)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"per_device_train_batch_size": 12.5},
            "per_device_train_batch_size: expected an integer, got 12.5 (a number)",
        ),
        ({"fn_alpha": [0.1, 0.2]}, "fn_alpha: expected a number, got [0.1, 0.2] (a list)"),
        (
            {"glofnd_alpha": [0.1, 0.2]},
            "glofnd_alpha: expected a number or null, got [0.1, 0.2] (a list)",
        ),
        (
            {"loss_type": "infonce"},
            "loss_type: expected one of 'clip', 'sogclr', 'fastclip', 'sigmoid', got 'infonce' (a string)",
        ),
        ({"use_cpu": "maybe"}, "use_cpu: expected true or false, got 'maybe' (a string)"),
        (
            {"class_names": "zero"},
            "class_names: expected a list of strings or null, got 'zero' (a string)",
        ),
        ({"num_train_epochs": "two"}, "num_train_epochs: expected a number, got 'two' (a string)"),
    ],
)
def test_config_types_are_checked_before_anything_loads(
    tmp_path, capsys, no_loading, values, message
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"dataset_name": "glofnd-digits", "output_dir": str(tmp_path / "out"), **values}
        )
    )
    before = tree_digest(tmp_path)
    with pytest.raises(SystemExit) as info:
        train_cli.main([str(recipe)])
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err, "glofnd-train") == (
        f"glofnd-train: error: {recipe}: {message}{DEBUG_HINT}"
    )
    assert tree_digest(tmp_path) == before


def test_detector_settings_types_and_debug(tmp_path, capsys, no_loading):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "dataset_name": "glofnd-digits",
                "output_dir": str(tmp_path / "out"),
                "detector_kwargs": {"band": "wide"},
            }
        )
    )
    with pytest.raises(SystemExit) as info:
        train_cli.main([str(recipe)])
    assert info.value.code == 2
    err = one_line(capsys.readouterr().err, "glofnd-train")
    assert err.endswith(f": band: expected a number, got 'wide' (a string){DEBUG_HINT}")
    assert "invalid settings for the 'glofnd' detector" in err
    # --debug (transformers' own --debug takes a value: this one stands alone) shows it all.
    with pytest.raises(SystemExit) as info:
        train_cli.main([str(recipe), "--debug"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "band: expected a number" in err.splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_older_value_spellings_still_parse(tmp_path):
    from glofnd_hf.args import DataArguments, GloFNDTrainingArguments, ModelArguments
    from glofnd_hf.cli.config import parse_config_and_flags

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "loss_type: fastclip\ntemperature_scheme: global_learnable\nlearning_rate: 1e-3\n"
        f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\n"
    )
    with pytest.warns(FutureWarning, match="global_learnable"):
        _, _, args = parse_config_and_flags(
            (ModelArguments, DataArguments, GloFNDTrainingArguments), [str(recipe)]
        )
    assert args.temperature_scheme == "learnable" and args.learning_rate == 1e-3


def test_data_source_failure_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_cli.main(
            [
                "--dataset_name",
                str(tmp_path / "no-such-data"),
                "--output_dir",
                str(tmp_path / "out"),
                "--use_cpu",
                "true",
            ]
        )
    assert info.value.code == 2
    err = one_line(capsys.readouterr().err, "glofnd-train")
    assert "no-such-data" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- item 7


def test_tokens_are_never_saved_with_the_training_arguments(tmp_path):
    from glofnd_hf.data.digits import load_digits_pairs
    from glofnd_hf.models import build_tiny_open_clip
    from glofnd_hf.trainer import GloFNDTrainer

    secret = "not-an-hf-looking-secret-42"  # found by the pickled name, not by its form
    args = cpu_args(
        tmp_path,
        hub_token=secret,
        per_device_train_batch_size=8,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        loss_type="clip",
        detector="none",
    )
    train = load_digits_pairs(seed=0)["train"].select(range(16))
    trainer = GloFNDTrainer(build_tiny_open_clip(seed=0), args, train_dataset=train)
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    saved = sorted((tmp_path / "out").rglob("training_args.bin"))
    assert [p.parent.name for p in saved] == ["checkpoint-1", "checkpoint-2", "out"]
    for path in saved:
        assert secret.encode() not in path.read_bytes()
        assert find_secrets(path, [secret]) == []
        loaded = torch.load(path, weights_only=False)
        assert loaded.hub_token is None and loaded.output_dir == args.output_dir
    assert trainer.args.hub_token == secret  # the running process keeps it


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    save_for_hub(build_tiny_hf_clip(seed=0, texts=["a red circle"]), folder)
    (folder / "README.md").unlink()  # the push renders the card
    return folder


def test_push_refuses_files_that_hold_a_token(tmp_path, monkeypatch, capsys):
    from transformers import TrainingArguments

    folder = model_folder(tmp_path)
    capsys.readouterr()  # saving the model shows progress bars
    old = TrainingArguments(output_dir=str(tmp_path), hub_token="older-secret", report_to="none")
    torch.save(old, folder / "training_args.bin")  # as written before this version
    fake = FakeHub()
    fake.install(monkeypatch)
    before = tree_digest(folder)
    argv = [str(folder), "--repo-id", "org/model", "--include-training-state"]
    with pytest.raises(SystemExit) as info:
        push_main(argv)
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err, "glofnd-push") == (
        "glofnd-push: error: refusing to upload training_args.bin: it holds the pickled setting "
        "'hub_token'. Nothing was uploaded; delete or fix the file (an old training_args.bin: "
        f"leave out --include-training-state){DEBUG_HINT}"
    )
    assert fake.calls == [] and tree_digest(folder) == before
    # Without the training state the file stays local; a token pasted into a file is refused.
    # notes.txt is not a model file: it stays local unless named with --include.
    (folder / "notes.txt").write_text(f"login with {TOKEN}\n")
    before = tree_digest(folder)
    with pytest.raises(SystemExit):
        push_main([*argv[:3], "--include", "notes.txt"])
    assert "refusing to upload notes.txt: it holds an access token" in capsys.readouterr().err
    assert fake.calls == [] and tree_digest(folder) == before
    (folder / "notes.txt").unlink()
    assert push_main(argv[:3]) == 0
    assert "training_args.bin" not in fake.calls[1][2]["files"]


# ----------------------------------------------------------------------------- item 8


def _http_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(
        f"{status} Client Error: Unauthorized for url: https://huggingface.co/api/repos/create",
        response=httpx2.Response(status, request=request),
    )


@pytest.mark.parametrize(
    "where, error, line",
    [
        (
            "create_repo",
            _http_error(401),
            "HfHubHTTPError: 401 Client Error: Unauthorized for url: "
            "https://huggingface.co/api/repos/create (check the access token: HF_TOKEN or "
            "`hf auth login`)",
        ),
        (
            "create_commit",
            httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
            "ConnectError: [Errno -3] Temporary failure in name resolution (is the network "
            "reachable?)",
        ),
        (
            "create_repo",
            OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
            "OfflineModeIsEnabled: Cannot reach https://huggingface.co: offline mode is enabled.",
        ),
    ],
)
def test_push_hub_failures_leave_the_folder_untouched(
    tmp_path, monkeypatch, capsys, where, error, line
):
    folder = model_folder(tmp_path)
    capsys.readouterr()  # saving the model shows progress bars
    card_json = (folder / "glofnd_card.json").read_bytes()
    fake = FakeHub(fail=error if where == "create_commit" else None)
    fake.install(monkeypatch)
    if where == "create_repo":

        def create_repo(api, repo_id, **kwargs):
            raise error

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
    before = tree_digest(folder)
    with pytest.raises(SystemExit) as info:
        push_main([str(folder), "--repo-id", "org/model"])
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err, "glofnd-push") == (
        f"glofnd-push: error: {line}{DEBUG_HINT}"
    )
    assert tree_digest(folder) == before and not (folder / "README.md").exists()
    # The same push succeeds once the Hub answers: only then is the card written locally.
    fake = FakeHub()
    fake.install(monkeypatch)
    assert push_main([str(folder), "--repo-id", "org/model"]) == 0
    sent = fake.calls[1][2]["files"]
    assert sent["README.md"] == (folder / "README.md").read_bytes()
    assert b"org/model" in sent["README.md"] and (folder / "glofnd_card.json").read_bytes() != (
        card_json
    )


def test_eval_user_error_and_debug(tmp_path, capsys):
    argv = ["--model", "unused", "--dataset", "glofnd-digits"]
    argv += ["--templates-file", str(tmp_path / "missing.txt")]
    with pytest.raises(SystemExit) as info:
        eval_main(argv)
    assert info.value.code == 2
    err = one_line(capsys.readouterr().err, "glofnd-eval")
    assert err.startswith("glofnd-eval: error: cannot read the templates file ")
    with pytest.raises(SystemExit):
        eval_main([*argv, "--debug"])
    assert "Traceback" in capsys.readouterr().err


def test_shards_into_a_non_empty_folder(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "00001.tar", [good_sample(i) for i in range(4)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"an older shard")
    (out / "notes.txt").write_text("keep me")
    before = tree_digest(out)
    argv = ["add-index", str(src / "00001.tar"), str(out)]
    with pytest.raises(SystemExit) as info:
        shards_main(argv)
    assert info.value.code == 2
    assert one_line(capsys.readouterr().err, "glofnd-shards") == (
        f"glofnd-shards: error: output folder {out} is not empty (it holds 00000.tar, "
        "notes.txt): choose a new folder, or pass --overwrite (overwrite=True) to replace the "
        f"shards there{DEBUG_HINT}"
    )
    assert tree_digest(out) == before
    assert shards_main([*argv, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["00001.tar", "glofnd_index.json", "notes.txt", "sizes.json"]
    assert (out / "notes.txt").read_text() == "keep me"
