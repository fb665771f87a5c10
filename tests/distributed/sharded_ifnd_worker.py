"""Run by torchrun in tests: IFND with its per-sample state sharded (torch k-means) beside
IFND replicated with the same torch k-means (rank 0 clusters every row alone, as one process
would), on fixed global batches of clustered embeddings (no model). Records per step whether
the detections, statistics and state were bit-identical, and the global batch's detections;
optionally writes a per-process checkpoint after step ``--save-at``, and (``--resume-from``)
runs again from a checkpoint of any world size (a reshard) from step ``--from-step``."""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glofnd_hf.fnd import build_detector
from glofnd_hf.fnd.detectors import DetectionBatch
from glofnd_hf.losses import ClipLoss
from glofnd_hf.state_shards import load_state_shards, write_shard_manifest, write_state_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from distributed.common import bitwise_equal, shut_down_process_group  # noqa: E402

N, BATCH, WIDTH = 48, 12, 8  # 12 divides over 2 and 3 processes: the same global batches
STEPS_PER_EPOCH = N // BATCH

# Two granularities with global ranks; per-cluster ranks with margins, "any" and restarts.
CASES = {
    "global": {"num_clusters": [4, 6], "kmeans_iters": 20},
    "cluster": {
        "num_clusters": [5],
        "accept_scope": "cluster",
        "confidence": "margin",
        "combine": "any",
        "kmeans_n_init": 2,
    },
}


def build(case, sharding):
    options = {
        **CASES[case],
        "kmeans": "torch",
        "start_epoch": 0.0,
        "accept_warmup_epochs": 4.0,  # partial acceptance: the ranks decide
    }
    detector = build_detector("ifnd", num_samples=N, options=options, sharding=sharding)
    return ClipLoss(detector)  # the loss's names of the tables and extras in checkpoints


def embeddings():
    gen = torch.Generator().manual_seed(7)
    centres = F.normalize(torch.randn(6, WIDTH, generator=gen), dim=-1)
    base = centres[torch.arange(N) % 6]
    image = base + 0.4 * torch.randn(N, WIDTH, generator=gen)
    return image, base + 0.4 * torch.randn(N, WIDTH, generator=gen)


def global_batch(step):
    epoch = step // STEPS_PER_EPOCH
    order = torch.randperm(N, generator=torch.Generator().manual_seed(50 + epoch))
    index = order[(step % STEPS_PER_EPOCH) * BATCH :][:BATCH].clone()
    index[5] = index[10]  # a repeated index in one global batch
    return index


def same(a, b) -> bool:
    """Bit for bit (NaN payloads and the sign of zero included); None only as None."""
    if a is None or b is None:
        return a is None and b is None
    return bitwise_equal(a, b)


def same_state(a: dict, b: dict) -> bool:
    keys = a.keys() - {"detector.round_seconds"}  # wall time
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in keys)


def step_once(losses, step, features):
    """Observe and detect on this rank's share of the global batch of ``step``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    image, text = features
    index = global_batch(step)
    b = BATCH // world
    mine = slice(rank * b, (rank + 1) * b)
    local = index[mine]
    img, txt = F.normalize(image[index], dim=-1), F.normalize(text[index], dim=-1)
    sim = torch.stack([img[mine] @ txt.t(), txt[mine] @ img.t()])
    negatives = local.unsqueeze(1) != index.unsqueeze(0)
    found = {}
    for sharding, loss in losses.items():
        det = loss.detector
        det.observe(local, image[local], text[local])
        found[sharding] = det.detect(sim, DetectionBatch(local, index, negatives, step / 4))
    return found


def global_detections(found):
    """The (2, B, B) detections of the whole global batch (every rank's anchors)."""
    if found is None:
        return None
    parts = [torch.empty_like(found) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, found.contiguous())
    return torch.cat(parts, 1)


def run(opts, case, first, resume_from=None, save=False):
    """Steps ``first`` to ``opts.steps - 1`` of both detectors (from a checkpoint folder
    when given), comparing them after every step."""
    features = embeddings()
    losses = {sharding: build(case, sharding) for sharding in ("replicated", "sharded")}
    record = {"same_fn": [], "same_stats": [], "same_state": [], "fn": [], "stats": []}
    if resume_from:
        for loss in losses.values():  # replicated: every row; sharded: this process's
            load_state_shards(os.path.join(resume_from, case), loss, N)
        record["loaded"] = losses["sharded"].state_dict()
    for step in range(first, opts.steps):
        found = step_once(losses, step, features)
        rep, shd = found["replicated"], found["sharded"]
        record["same_fn"].append(same(rep.false_negatives, shd.false_negatives))
        keys = rep.stats.keys() - {"ifnd_cluster_seconds"}  # wall time
        record["same_stats"].append(
            rep.stats.keys() == shd.stats.keys()
            and all(same(rep.stats[k], shd.stats[k]) for k in keys)
        )
        record["stats"].append({k: float(shd.stats[k]) for k in keys})
        record["fn"].append(global_detections(shd.false_negatives))
        states = {s: loss.state_dict() for s, loss in losses.items()}
        record["same_state"].append(same_state(states["replicated"], states["sharded"]))
        if save and step + 1 == opts.save_at:
            folder = os.path.join(opts.save_dir, case)
            os.makedirs(folder, exist_ok=True)
            write_state_shard(folder, losses["sharded"], N)
            dist.barrier()  # every shard on disk before the manifest marks the set
            if dist.get_rank() == 0:
                config = losses["sharded"].config_dict()
                write_shard_manifest(folder, config, N, dist.get_world_size())
            record["saved"] = states["sharded"]
    record["final"] = states["sharded"]
    record["owned"] = int(losses["sharded"].detector.tables.bank.data.shape[0])
    record["rounds"] = losses["sharded"].detector.rounds
    return record


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--from-step", type=int, default=0, help="first step after a resume")
    opts = parser.parse_args()
    dist.init_process_group("gloo")
    results = {}
    for case in CASES:
        results[case] = run(opts, case, 0, save=opts.save_at is not None)
        if opts.resume_from:
            resumed = run(opts, case, opts.from_step, resume_from=opts.resume_from)
            results[f"{case}-resumed"] = resumed
    torch.save(results, f"{opts.out}.rank{dist.get_rank()}")
    shut_down_process_group()


if __name__ == "__main__":
    main()
