"""``push_to_hub=True`` inside training (issue 31, item 1), against a local recorder of the Hub
API: the GloFND card named after the repo, the model's files only, the checkpoints with their
per-sample state, and a downloaded ``last-checkpoint`` that resumes like the local one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, RepoUrl
from safetensors.torch import load_file

from glofnd_hf.checkpoints import STATE_FILE

REPO = "test-org/glofnd-pushed"
SECRET = "hf_" + "x" * 34


class HubRecorder:
    """create_repo / create_commit as the Hub would answer them; every commit's files kept."""

    def __init__(self) -> None:
        self.commits: list[dict] = []

    def install(self, monkeypatch) -> HubRecorder:
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, **kwargs):
            files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            recorder.commits.append({"repo_id": repo_id, "files": files, **kwargs})

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self

    def latest(self, path: str) -> bytes:
        for commit in reversed(self.commits):
            if path in commit["files"]:
                return commit["files"][path]
        raise KeyError(path)

    def download(self, folder: str, into: Path) -> Path:
        """The repo's ``folder`` as its last commits left it."""
        target = into / folder
        for commit in self.commits:
            for path, data in commit["files"].items():
                if path.startswith(folder + "/"):
                    (target / path[len(folder) + 1 :]).parent.mkdir(parents=True, exist_ok=True)
                    (target / path[len(folder) + 1 :]).write_bytes(data)
        return target


def _trainer(out: Path, family: str, **overrides):
    from test_checkpoints import tiny_trainer

    return tiny_trainer(
        out, family, **{"save_steps": 2, "max_steps": 4, "fn_alpha": 0.2, **overrides}
    )


@pytest.mark.parametrize("family", ["hf", "open_clip"])
def test_training_pushes_the_glofnd_card_and_resumable_checkpoints(tmp_path, monkeypatch, family):
    hub = HubRecorder().install(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".env").write_text("WANDB_API_KEY=0123456789abcdef0123456789abcdef\n")
    pushing = dict(push_to_hub=True, hub_model_id=REPO, hub_strategy="checkpoint")
    trainer = _trainer(out, family, hub_token=SECRET, **pushing)
    trainer.train()
    trainer.push_to_hub()

    assert hub.commits and all(c["repo_id"] == REPO for c in hub.commits)
    sent = {path for c in hub.commits for path in c["files"]}
    assert not any(Path(p).name.startswith(".") for p in sent), sent
    assert not any(p.startswith("checkpoint-") for p in sent), sent
    for commit in hub.commits:
        for path, data in commit["files"].items():
            assert SECRET.encode() not in data, path
    card = hub.latest("README.md").decode()
    assert f"model_name: {REPO}" in card and f"# {REPO}" in card
    assert "More information needed" not in card and "generated_from_trainer" not in card
    assert "GloFND" in card or "glofnd" in card
    local_card = (out / "README.md").read_text()
    assert f"# {REPO}" in local_card  # the local card is named after the repo too
    weights = "open_clip_model.safetensors" if family == "open_clip" else "model.safetensors"
    assert weights in sent
    assert f"last-checkpoint/{STATE_FILE}" in sent and "last-checkpoint/optimizer.pt" in sent
    assert STATE_FILE not in sent and "optimizer.pt" not in sent  # training state stays below

    # A downloaded last-checkpoint resumes exactly as the local checkpoint does.
    downloaded = hub.download("last-checkpoint", tmp_path / "download")
    local = out / "checkpoint-4"
    expected = load_file(str(local / STATE_FILE))
    assert load_file(str(downloaded / STATE_FILE)).keys() == expected.keys()
    finals = {}
    for name, source in (("hub", downloaded), ("local", local)):
        resumed = _trainer(tmp_path / f"resumed-{name}", family, max_steps=6, save_strategy="no")
        resumed.load_fnd_state(str(source))
        for key, value in resumed.contrastive_loss.state_dict().items():
            assert torch.equal(value, expected[key]), key  # the thresholds restored
        resumed.train(resume_from_checkpoint=str(source))
        finals[name] = (resumed.contrastive_loss.state_dict(), resumed.model.state_dict())
    for a, b in zip(finals["hub"], finals["local"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_glofnd_train_pushes_its_card_with_the_scores(tmp_path, monkeypatch):
    from glofnd_hf.cli import train as cli

    hub = HubRecorder().install(monkeypatch)
    out = tmp_path / "run"
    argv = ["--dataset_name", "glofnd-digits", "--max_train_samples", "16"]
    argv += ["--max_eval_samples", "20", "--per_device_train_batch_size", "8"]
    argv += ["--tiny_image_size", "16", "--output_dir", str(out), "--use_cpu", "true"]
    argv += ["--report_to", "none", "--max_steps", "2", "--save_strategy", "no"]
    argv += ["--push_to_hub", "true", "--hub_model_id", REPO, "--disable_tqdm", "true"]
    argv += ["--do_eval", "true"]
    assert cli.main(argv) == 0
    card = hub.latest("README.md").decode()
    assert f"# {REPO}" in card and "recall@1" in card.lower()
    assert "More information needed" not in card
    assert (out / "README.md").read_text() == card
