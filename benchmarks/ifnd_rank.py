"""How far IFND's histogram acceptance ranks (``kmeans: torch``, what ``state_sharding:
sharded`` runs) are from the exact ranks of the confidence order (``kmeans: sklearn``).

Clusters a synthetic bank (k noisy centres, float16 rows) with the torch k-means in one
process, then ranks the same confidences both ways, over the whole data set and within each
cluster, and reports per scope and bin count: the largest and mean |histogram rank - exact
rank|, the bound (the largest bin count over the count ranked), and how many samples the
accepted sets differ by at several accepted fractions.

    .venv/bin/python benchmarks/ifnd_rank.py --samples 1000000 --clusters 100
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from glofnd_hf.fnd.clustering import acceptance_rank
from glofnd_hf.fnd.ifnd_config import IFNDConfig
from glofnd_hf.fnd.kmeans_torch import MIN_CLUSTER_BINS, Collectives, cluster_rows, histogram_rank

FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)


def bank(n: int, k: int, width: int, noise: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, width, generator=gen), dim=-1)
    rows = centres[torch.randint(k, (n,), generator=gen)]
    rows = rows + noise * torch.randn(n, width, generator=gen)
    return F.normalize(rows, dim=-1).half()


def compare(labels, conf, scope: str, bins: int, k: int) -> dict[str, float]:
    """Histogram against exact ranks of the same confidences."""
    n = conf.shape[0]
    exact = acceptance_rank(labels, conf, scope).double()
    groups = labels if scope == "cluster" else torch.zeros_like(labels)
    per = max(MIN_CLUSTER_BINS, bins // k) if scope == "cluster" else bins
    hist = histogram_rank(conf, groups, k if scope == "cluster" else 1, per, Collectives(False))
    error = (hist.double() - exact).abs()
    # The bound: a sample's two ranks lie in its bin's block of positions.
    high = torch.zeros(k).scatter_reduce(0, groups, conf, "amax", include_self=False)
    low = torch.zeros(k).scatter_reduce(0, groups, conf, "amin", include_self=False)
    width = (high - low).double()[groups]
    slot = ((high.double()[groups] - conf.double()) / width * per).floor().clamp(0, per - 1)
    key = groups * per + slot.long()
    counts = torch.bincount(key, minlength=k * per).double()
    sizes = torch.bincount(groups, minlength=k).double()
    bound = (counts[key] / sizes[groups]).max()
    out = {"max": float(error.max()), "mean": float(error.mean()), "bound": float(bound)}
    for f in FRACTIONS:
        differ = ((hist.double() <= f) != (exact <= f)).sum()
        out[f"differ@{f}"] = int(differ) / n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--bins", type=int, nargs="+", default=[4096, 65536])
    parser.add_argument("--iters", type=int, default=10)
    opts = parser.parse_args()
    rows = bank(opts.samples, opts.clusters, opts.width, opts.noise)
    config = IFNDConfig(num_clusters=(opts.clusters,), kmeans_iters=opts.iters, kmeans="torch")
    start = time.perf_counter()
    index = torch.arange(opts.samples)
    seen = torch.ones(opts.samples, dtype=torch.bool)
    labels, conf, _, _ = cluster_rows(
        rows, index, seen, config.num_clusters, [0], config, Collectives(False)
    )
    print(
        f"N={opts.samples} k={opts.clusters} D={opts.width} noise={opts.noise}: torch "
        f"k-means ({opts.iters} iterations) {time.perf_counter() - start:.1f} s"
    )
    labels, conf = labels[0], conf[0]
    header = "| scope | bins | max error | mean error | bound | " + " | ".join(
        f"differ at {f}" for f in FRACTIONS
    )
    print(header + " |")
    print("|" + "---|" * (5 + len(FRACTIONS)))
    for scope in ("global", "cluster"):
        for bins in opts.bins:
            r = compare(labels, conf, scope, bins, opts.clusters)
            differ = " | ".join(f"{r[f'differ@{f}']:.2e}" for f in FRACTIONS)
            print(
                f"| {scope} | {bins} | {r['max']:.2e} | {r['mean']:.2e} | {r['bound']:.2e} | "
                f"{differ} |"
            )


if __name__ == "__main__":
    main()
