"""Zero-shot evaluation shared by two processes (torchrun, gloo) == one process alone."""

import sys

import torch
from distributed.common import eval_setup, save_eval_inputs
from launch import TESTS, free_port, run_process_group, worker_env


def test_two_processes_evaluate_like_one(tmp_path):
    out = tmp_path / "eval"
    save_eval_inputs(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd += [
        str(TESTS / "distributed" / "eval_worker.py"),
        "--inputs",
        str(tmp_path),
        "--out",
        str(out),
    ]
    proc = run_process_group(cmd, worker_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(2)]

    adapter, evaluator = eval_setup(tmp_path)
    embeds = evaluator.embed(adapter)
    metrics = evaluator.score(embeds)
    assert {"text_to_image_recall@1", "top1_accuracy"} <= set(metrics)
    for rank in ranks:
        # Each rank embedded its share of whole batches; gathered, they are one process's.
        assert set(rank["embeds"]) == {"images", "texts", "classes"}
        for key, value in embeds.items():
            assert rank["embeds"][key].shape == value.shape, key
            assert torch.allclose(rank["embeds"][key], value, atol=1e-6), key
        # Scored once, and every rank gets the same metrics: those of one process.
        assert rank["metrics"] == metrics
    # Progress bars on the main process only.
    assert [rank["bar_shown"] for rank in ranks] == [True, False]
