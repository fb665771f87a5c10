"""``glofnd-push`` sends an allow-list (issue 31, item 4): the model's files, what
``--include`` names, the training state on request; never dotfiles, never a file holding a
secret it recognises; a glofnd-eval report stays local unless named, and then goes without
local paths. The Hub API is the local recorder ``FakeHub``: nothing leaves the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_hub import FakeHub

from glofnd_hf.cli.push import main as push_main
from glofnd_hf.hub import (
    MODEL_FILE_PATTERNS,
    find_upload_secrets,
    plan_upload,
    save_for_hub,
    without_local_paths,
)
from glofnd_hf.models import build_tiny_hf_clip, build_tiny_open_clip_siglip

# Made-up values in the forms of real credentials (none of them is a real key).
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
SECRETS = {
    "wandb": f"WANDB_API_KEY={WANDB_KEY}\n",
    "aws id": "aws_access_key_id = AKIAABCDEFGHIJKLMNOP\n",
    "aws secret": "AWS_SECRET_ACCESS_KEY=abcdEFGHijklMNOPqrstUVWXyz0123456789abcd\n",
    "private key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n",
    "json api key": json.dumps({"openai_api_key": "sk-" + "a1B2" * 12}),
    "service token": "export MY_SERVICE_TOKEN='tok_live_abcdefghijklmnop'\n",
    "password": 'db:\n  password: "correct-horse-battery-staple"\n',
    "github": "remote = https://ghp_" + "x" * 36 + "@github.com/org/repo\n",
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A saved tiny model with what a working folder gathers next to it."""
    folder = save_for_hub(build_tiny_hf_clip(seed=0, texts=["a red circle"]), tmp_path / "m")
    (folder / ".env").write_text(SECRETS["wandb"])
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("[core]\n")
    run = folder / "wandb" / "run-20260101_000000-abc"
    (run / "files").mkdir(parents=True)
    (run / "files" / "config.yaml").write_text(f"_wandb:\n  api_key: {WANDB_KEY}\n")
    (run / "files" / "output.log").write_text("step 1\n")
    (folder / "wandb" / "debug.log").write_text(f"loading settings from {folder}\n")
    report = {
        "format_version": 1,
        "model": {"name": str(folder), "family": "hf"},
        "data": {"kind": "datasets", "source": "/data/private/coco_copy", "split": "test"},
        "metrics": {"text_to_image_recall@1": 0.5},
        "note": f"shards '{tmp_path}/shards/{{0000..0009}}.tar' (see https://example.org/a/b)",
    }
    (folder / "results.json").write_text(json.dumps(report))
    (folder / "notes.txt").write_text("tried lr 1e-4\n")
    return folder


def _push(folder: Path, *extra: str, fake: FakeHub) -> dict[str, bytes]:
    assert push_main([str(folder), "--repo-id", "org/model", *extra]) == 0
    return fake.calls[-1][2]["files"]


def test_only_the_model_is_uploaded_and_the_rest_is_listed(folder, monkeypatch, capsys):
    fake = FakeHub()
    fake.install(monkeypatch)
    sent = _push(folder, fake=fake)
    assert set(sent) == {
        "README.md",
        "config.json",
        "glofnd_card.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    for name in sent:
        assert "/" not in name and any(Path(name).match(p) for p in MODEL_FILE_PATTERNS)
    everything = b"\n".join(sent.values())
    assert WANDB_KEY.encode() not in everything and b"/data/private" not in everything
    printed = capsys.readouterr().out
    skipped = printed.split("not uploading", 1)[1].split("uploading ", 1)[0]
    for line in (
        ".env (a dotfile or dot-folder: never uploaded)",
        ".git/config (a dotfile or dot-folder: never uploaded)",
        "wandb/ (3 files, not part of the model: --include GLOB uploads it)",
        "results.json (a glofnd-eval report: --eval-results puts its metrics into the card; "
        "--include uploads it without local paths)",
        "notes.txt (not part of the model: --include GLOB uploads it)",
    ):
        assert f"  {line}\n" in skipped, line
    assert WANDB_KEY not in printed


def test_an_included_report_goes_without_local_paths(folder, tmp_path, monkeypatch):
    fake = FakeHub()
    fake.install(monkeypatch)
    before = (folder / "results.json").read_bytes()
    sent = _push(folder, "--include", "results.json", "--include", "notes.txt", fake=fake)
    assert "notes.txt" in sent and "wandb/debug.log" not in sent
    report = json.loads(sent["results.json"])
    text = sent["results.json"].decode()
    assert str(tmp_path) not in text and "/data/private" not in text
    assert report["model"]["name"] == report["data"]["source"] == "<local path>"
    assert report["metrics"] == {"text_to_image_recall@1": 0.5}  # the rest as it was
    assert report["note"] == "shards '<local path>' (see https://example.org/a/b)"
    assert (folder / "results.json").read_bytes() == before  # the local file is untouched


def test_dotfiles_are_never_uploaded_even_when_named(folder, monkeypatch, capsys):
    fake = FakeHub()
    fake.install(monkeypatch)
    sent = _push(folder, "--include", ".env", "--include", ".git", fake=fake)
    assert ".env" not in sent and not any(name.startswith(".git") for name in sent)
    # '*' names everything: the dotfiles still stay local, and wandb's copy of the key in
    # its run config stops the push before anything is sent
    fake.calls.clear()
    with pytest.raises(SystemExit):
        push_main([str(folder), "--repo-id", "org/model", "--include", "*"])
    err = capsys.readouterr().err
    assert "refusing to upload wandb/run-20260101_000000-abc/files/config.yaml" in err
    assert "a value of api_key" in err and fake.calls == []
    (folder / "wandb" / "run-20260101_000000-abc" / "files" / "config.yaml").unlink()
    sent = _push(folder, "--include", "*", fake=fake)
    assert not any(part.startswith(".") for name in sent for part in name.split("/"))
    assert {"wandb/debug.log", "notes.txt", "results.json"} <= set(sent)


@pytest.mark.parametrize("kind", list(SECRETS))
def test_a_named_file_holding_a_secret_stops_the_push(folder, kind, monkeypatch, capsys):
    (folder / "notes.txt").write_text(SECRETS[kind])
    fake = FakeHub()
    fake.install(monkeypatch)
    with pytest.raises(SystemExit) as info:
        push_main([str(folder), "--repo-id", "org/model", "--include", "notes.txt"])
    assert info.value.code == 2 and fake.calls == []
    err = capsys.readouterr().err
    assert "refusing to upload notes.txt: it holds" in err
    assert SECRETS[kind].strip().splitlines()[-1][-12:] not in err  # names, never values


def test_the_secret_scan_leaves_model_files_alone(tmp_path):
    """A tokenizer's special tokens, config ids and the card are no credentials."""
    hf = save_for_hub(build_tiny_hf_clip(seed=0, texts=["a red circle"]), tmp_path / "hf")
    oc = save_for_hub(build_tiny_open_clip_siglip(seed=0), tmp_path / "oc")
    for folder in (hf, oc):
        for name in plan_upload(folder).files:
            assert find_upload_secrets(folder / name) == [], name
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "a" * 20}))
    assert find_upload_secrets(config) == []
    for kind, text in SECRETS.items():
        path = tmp_path / f"{kind.replace(' ', '_')}.txt"
        path.write_text(text)
        assert find_upload_secrets(path), kind


def test_the_pushed_tokenizer_config_loads_with_transformers_4(folder, monkeypatch):
    """A folder re-saved by transformers 5 names TokenizersBackend (4.x cannot load it):
    the pushed copy names PreTrainedTokenizerFast, the local file stays as it was."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    before = path.read_bytes()
    fake = FakeHub()
    fake.install(monkeypatch)
    sent = _push(folder, fake=fake)
    pushed = json.loads(sent["tokenizer_config.json"])
    assert pushed == {**config, "tokenizer_class": "PreTrainedTokenizerFast"}
    assert path.read_bytes() == before


def test_without_local_paths():
    assert without_local_paths(
        {
            "/abs/key": ["/home/me/data", "~/x", "local-dir:/m", "C:\\data\\x", "a/b", "1 / 2"],
            "url": "https://huggingface.co/org/m and hf-hub:org/m",
        }
    ) == {
        "<local path>": ["<local path>", "<local path>", "<local path>", "<local path>"]
        + ["a/b", "1 / 2"],
        "url": "https://huggingface.co/org/m and hf-hub:org/m",
    }


def test_per_process_state_shards_are_training_state(tmp_path):
    from glofnd_hf.hub import plan_upload

    (tmp_path / "model.safetensors").write_bytes(b"x")
    for name in ("glofnd_state.safetensors", "glofnd_state.rank0-of-2.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    assert plan_upload(tmp_path).files == ["model.safetensors"]
    assert "glofnd_state.rank0-of-2.safetensors" in plan_upload(tmp_path, (), True).files
