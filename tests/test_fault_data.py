"""Fault injection into training and evaluation data (issue 14, items 4 and 6): shards cut or
corrupted anywhere, and rows without a caption."""

import hashlib
import json
import tarfile

import datasets
import pytest
import torch
from test_shards import config, good_sample, to_tensor, tokenize, write_tar

from glofnd_hf.cli.shards import main as shards_main
from glofnd_hf.data.bad_samples import BAD_SAMPLE_KINDS
from glofnd_hf.data.digits import load_digits_pairs
from glofnd_hf.data.hf import ImageTextCollator
from glofnd_hf.data.shards import build_shard_loader
from glofnd_hf.eval.data import load_shards_for_eval
from glofnd_hf.eval.errors import EvalInputError
from glofnd_hf.eval.zero_shot import ZeroShotEvaluator


def tree_digest(folder):
    """Path -> sha256 of every file under ``folder`` (empty when it does not exist)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def member_offsets(path):
    """(name, header offset, data offset) of every member of a tar file."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def cut_at(data, offsets, how):
    """The bytes of a shard damaged so that sample 5 (and what follows) is lost."""
    members = {name: (header, start) for name, header, start in offsets}
    header, start = members["000000025.jpg"]  # the first member of sample 5 of shard 2
    second, _ = members["000000025.txt"]  # a later member of the same sample
    if how == "header boundary":
        return data[:header]  # `head -c` at a 512-byte boundary: no error from tarfile
    if how == "inside a header":
        return data[: header + 100]
    if how == "inside data":
        return data[: start + 10]
    if how == "between members of a sample":
        return data[:second]  # sample 5 has its image but not its caption
    damaged = bytearray(data)
    damaged[header : header + 512] = (b"\0" if how == "zeroed header" else b"x") * 512
    return bytes(damaged)


# How the shard is damaged -> the first index lost. The sample being read when the damage
# shows may lack members that came after it: it is dropped too.
HOW = {
    "header boundary": 24,
    "inside a header": 24,
    "inside data": 24,
    "between members of a sample": 25,
    "zeroed header": 24,
    "garbage header": 24,
}


@pytest.fixture
def shards(tmp_path):
    """Two shards of 10 samples each (indices 10..29), written by tarfile."""
    src = tmp_path / "src"
    src.mkdir()
    for shard in (1, 2):
        write_tar(src / f"{shard:05d}.tar", [good_sample(10 * shard + r) for r in range(10)])
    (src / "sizes.json").write_text(json.dumps({"00001.tar": 10, "00002.tar": 10}))
    return src


@pytest.mark.parametrize("how", HOW)
def test_a_damaged_shard_is_detected_wherever_it_is_cut(shards, tmp_path, how, capsys):
    shard = shards / "00002.tar"
    shard.write_bytes(cut_at(shard.read_bytes(), member_offsets(shard), how))
    pattern = str(shards / "{00001..00002}.tar")

    # Training: the complete samples, the damaged shard counted once; one sample more than
    # they hold per epoch makes the loader read past the damage (then start a second pass).
    kept = list(range(10, HOW[how]))
    loader = build_shard_loader(
        config(
            pattern,
            batch_size=1,
            shuffle_buffer=0,
            shuffle_shards=False,
            train_num_samples=len(kept) + 1,
            dataset_size=30,
        ),
        to_tensor,
        tokenize,
    )
    seen = sorted(i for batch in loader for i in batch["dataset_index"].tolist())
    assert seen == sorted([*kept, 10])
    assert loader.bad_sample_counts == {
        k: (1 if k == "shard_read_error" else 0) for k in BAD_SAMPLE_KINDS
    }

    # add-index refuses it; an existing output folder keeps every byte.
    out = tmp_path / "indexed"
    out.mkdir()
    (out / "00009.tar").write_bytes(b"old shard")
    (out / "sizes.json").write_text('{"00009.tar": 1}')
    before = tree_digest(out)
    with pytest.raises(SystemExit) as info:
        shards_main(["add-index", pattern, str(out), "--overwrite"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"glofnd-shards: error: cannot read shard '{shard}' (near key ")
    assert "nothing was written" in err
    assert tree_digest(out) == before

    # Evaluation refuses it too.
    with pytest.raises(EvalInputError, match=r"could not read the shards: shard .*00002\.tar"):
        load_shards_for_eval(pattern)


def test_head_c_50000_of_a_shard_is_caught(tmp_path, capsys):
    """The reported case: `head -c 50000 00002.tar` of a larger shard."""
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "00002.tar", [good_sample(i) for i in range(60)])
    data = (src / "00002.tar").read_bytes()
    assert len(data) > 50000
    (src / "00002.tar").write_bytes(data[:50000])
    with pytest.raises(SystemExit) as info:
        shards_main(["add-index", str(src / "00002.tar"), str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"glofnd-shards: error: cannot read shard '{src / '00002.tar'}'")
    assert not (tmp_path / "out").exists()  # not even the folder is left behind


def test_intact_shards_still_read(shards, tmp_path):
    assert shards_main(["add-index", str(shards / "{00001..00002}.tar"), str(tmp_path / "o")]) == 0
    sizes = json.loads((tmp_path / "o" / "sizes.json").read_text())
    assert sizes == {"00001.tar": 10, "00002.tar": 10}


def test_bad_index_hint_names_the_setting(shards):
    pattern = str(shards / "{00001..00002}.tar")
    with pytest.raises(ValueError) as info:
        list(
            build_shard_loader(config(pattern, batch_size=4, dataset_size=15), to_tensor, tokenize)
        )
    message = str(info.value)
    assert "set shard_on_bad_index: skip" in message and "on_bad_index='skip'" not in message


# ----------------------------------------------------------------------------- captions

BAD_CAPTIONS = [None, "", "   ", [], [None, None], ["", " "]]


def rows_with_bad_captions():
    rows = load_digits_pairs(seed=0)["train"].select(range(16))
    captions = list(rows["caption"])
    for position, bad in zip((1, 3, 6, 9, 12, 14), BAD_CAPTIONS, strict=True):
        captions[position] = bad
    captions[4] = [None, "a drawn four"]  # a list with one usable caption is kept
    return [{**row, "caption": c} for row, c in zip(rows, captions, strict=True)]


def test_collator_skips_and_counts_missing_captions():
    rows = rows_with_bad_captions()
    seen_texts = []

    def tokenize_and_record(texts):
        seen_texts.extend(texts)
        return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long)}

    collator = ImageTextCollator(lambda im: torch.zeros(3, 4, 4), tokenize_and_record, seed=0)
    batch = collator(rows)
    assert batch["bad_sample_counts"].tolist() == [0, 6]  # corrupt_image, missing_caption
    assert collator.bad_sample_counts == {"corrupt_image": 0, "missing_caption": 6}
    bad = {rows[p]["dataset_index"] for p in (1, 3, 6, 9, 12, 14)}
    assert not bad & set(batch["dataset_index"].tolist())  # stand-ins are good rows
    assert len(batch["dataset_index"]) == 16
    assert "a drawn four" in seen_texts and all(
        isinstance(t, str) and t.strip() for t in seen_texts
    )


def test_glofnd_train_skips_rows_without_captions(tmp_path):
    """The tiny tokenizer crashed on a None caption while collecting texts."""
    import yaml

    from glofnd_hf.cli.train import main

    rows = load_digits_pairs(seed=0)["train"].select(range(32))
    captions = list(rows["caption"])
    for position, bad in zip((1, 5, 9, 17, 22, 30), (None, "", "   ", None, None, ""), strict=True):
        captions[position] = bad
    folder = tmp_path / "data"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": list(rows["image"]), "caption": captions})}
    ).save_to_disk(str(folder))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                dataset_name=str(folder),
                eval_split=None,
                output_dir=str(tmp_path / "out"),
                per_device_train_batch_size=8,
                num_train_epochs=1,
                logging_steps=1,
                save_steps=4,
                report_to="none",
                use_cpu=True,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
        )
    )
    assert main([str(recipe)]) == 0
    state = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    counts = [h for h in state["log_history"] if "bad_samples_missing_caption" in h]
    assert counts[-1]["step"] == 4  # one epoch: every row was visited once
    assert counts[-1]["bad_samples_missing_caption"] == 6
    assert counts[-1]["bad_samples_corrupt_image"] == 0


def test_evaluation_names_the_rows_without_captions():
    rows = load_digits_pairs(seed=0)["validation"].select(range(6))
    data = datasets.Dataset.from_dict(
        {"image": list(rows["image"]), "caption": [["a"], [None], ["b"], [""], ["c", "  "], []]},
        features=datasets.Features(
            {"image": datasets.Image(), "caption": datasets.List(datasets.Value("string"))}
        ),
    )
    with pytest.raises(ValueError) as info:
        ZeroShotEvaluator(data, show_progress=False)
    assert str(info.value) == (
        "4 of 6 evaluation rows have a missing or empty caption in column 'caption' "
        "(row 1: [None], row 3: [''], row 4: ['c', '  '], ...): every image needs non-empty "
        "captions; drop or fix these rows, or evaluate classification only"
    )
