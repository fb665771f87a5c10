"""Replay the batches of a recorded training run through threshold rules, offline.

``fn_study.py --record DIR`` saves every batch GloFND saw in training (indices, the (2, B, B)
similarities, the epoch) and the exact per-anchor (1 - alpha) quantiles of the training set
at every epoch end. This script feeds those batches to GloFND with any settings and scores
its thresholds against the exact quantiles at each epoch end: the same stream the detector
saw in training, without training again (open loop: the masks of the replayed rule do not
change the embeddings, which the recorded run's own masks did).

It also scores *pooled* estimates, the empirical (1 - alpha) quantile of all of an anchor's
similarities in its last K visits: what a rule that remembered every similarity it saw over
K epochs could reach. They bound what averaging can do on this stream.

    .venv/bin/python benchmarks/fn_study.py --detectors glofnd --record /tmp/rec
    .venv/bin/python benchmarks/replay_thresholds.py /tmp/rec/digits_seed0.pt \\
        --rule tail --rule "tail step_floor=0.1"
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's glofnd_hf

from glofnd_hf.fnd import GloFNDConfig, GloFNDDetector  # noqa: E402
from glofnd_hf.fnd.detectors import DetectionBatch  # noqa: E402

SIDES = 2
POOL_TOP = 32  # values kept per visit for the pooled estimates (more than alpha x K x B)


@dataclass
class Score:
    epoch: int
    median_error: float
    mae: float
    correlation: float
    mean_offset: float
    filtered_over_alpha: float | None = None
    fresh_over_alpha: float | None = None
    exact_over_alpha: float | None = None


@dataclass
class Replay:
    name: str
    scores: list[Score] = field(default_factory=list)


def parse_rule(text: str) -> tuple[str, dict[str, Any]]:
    """``"name key=value ..."`` -> (text, GloFNDConfig overrides); values read as JSON."""
    name, *pairs = text.split()
    overrides: dict[str, Any] = {"update_rule": name}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return text, overrides


def score(lam: torch.Tensor, exact: torch.Tensor, epoch: int) -> Score:
    diff = (lam - exact).flatten()
    corr = np.corrcoef(lam.flatten().numpy(), exact.flatten().numpy())[0, 1]
    return Score(
        epoch=epoch,
        median_error=float(diff.abs().median()),
        mae=float(diff.abs().mean()),
        correlation=float(corr) if math.isfinite(corr) else 0.0,
        mean_offset=float(diff.mean()),
    )


def epoch_of(batch: dict[str, Any]) -> int:
    """The integer epoch a recorded batch belongs to."""
    return math.floor(batch["epoch"] + 1e-9)


def epoch_ends(record: dict[str, Any]) -> list[int]:
    """Index of the last batch of each integer epoch, in order."""
    epochs = [epoch_of(b) for b in record["batches"]]
    return [i for i in range(len(epochs)) if i + 1 == len(epochs) or epochs[i + 1] != epochs[i]]


def exact_rule_over_alpha(record: dict[str, Any]) -> dict[int, float]:
    """Per epoch end, the share of the epoch's training-batch negatives that the exact
    quantiles of that epoch's end filter, over alpha (a property of the record, not of a
    rule)."""
    ends = set(epoch_ends(record))
    out: dict[int, float] = {}
    found = negatives = 0.0
    for i, batch in enumerate(record["batches"]):
        epoch = epoch_of(batch) + 1
        exact = record["exact"].get(epoch)
        if exact is not None:
            threshold = exact[:, batch["index"]].unsqueeze(-1)
            found += float(((batch["sim"] > threshold) & batch["negatives"]).sum())
            negatives += SIDES * float(batch["negatives"].sum())
        if i in ends:
            if exact is not None:
                out[epoch] = found / negatives / record["alpha"]
            found = negatives = 0.0
    return out


def replay_rule(
    record: dict[str, Any],
    name: str,
    overrides: dict[str, Any],
    column: str = "lambda",
    exact_ratios: dict[int, float] | None = None,
) -> Replay:
    """Scores ``column`` of the rule's state (the threshold, or e.g. the tail rule's
    centre) at each epoch end; ``exact_ratios`` from ``exact_rule_over_alpha``."""
    config = GloFNDConfig(alpha=record["alpha"], **overrides)
    detector = GloFNDDetector(record["num_samples"], config)
    ends = set(epoch_ends(record))
    out = Replay(name if column == "lambda" else f"{name} ({column})")
    filtered = negatives = fresh = 0.0
    for i, batch in enumerate(record["batches"]):
        index, sim, neg = batch["index"], batch["sim"], batch["negatives"]
        # Before the step: the thresholds as a batch not yet seen by the rule meets them.
        before = detector.state.lambdas(index).t().unsqueeze(-1)
        fresh += float(((sim > before) & neg).sum())
        found = detector.detect(
            sim, DetectionBatch(index, index, negatives=neg, epoch=batch["epoch"])
        ).false_negatives
        if found is not None:
            filtered += float(found.sum())
        negatives += SIDES * float(neg.sum())
        if i not in ends:
            continue
        epoch = epoch_of(batch) + 1
        exact = record["exact"].get(epoch)
        if exact is not None:
            state = detector.state.state_dict()
            lam = torch.stack([state[f"image.{column}"], state[f"text.{column}"]])
            s = score(lam, exact, epoch)
            s.filtered_over_alpha = filtered / negatives / record["alpha"]
            s.fresh_over_alpha = fresh / negatives / record["alpha"]
            s.exact_over_alpha = (exact_ratios or {}).get(epoch)
            out.scores.append(s)
        filtered = negatives = fresh = 0.0
    return out


def replay_pooled(record: dict[str, Any], memory: int) -> Replay:
    """The empirical (1 - alpha) quantile of each anchor's similarities over its visits of
    the last ``memory`` epochs (every visit's top values kept)."""
    n, alpha = record["num_samples"], record["alpha"]
    tops: dict[int, torch.Tensor] = {}  # epoch -> (n, 2, POOL_TOP) values
    counts: dict[int, torch.Tensor] = {}
    out = Replay(f"pooled over {memory} epoch(s)")
    ends = set(epoch_ends(record))
    for i, batch in enumerate(record["batches"]):
        epoch = epoch_of(batch)
        if epoch not in tops:
            tops[epoch] = torch.full((n, SIDES, POOL_TOP), float("-inf"))
            counts[epoch] = torch.zeros(n, SIDES)
        sim, neg, index = batch["sim"], batch["negatives"], batch["index"]
        k = min(POOL_TOP, sim.shape[-1])
        top = sim.masked_fill(~neg, float("-inf")).topk(k, dim=-1).values  # (2, b, k)
        tops[epoch][index, :, :k] = top.permute(1, 0, 2)
        counts[epoch][index] = neg.sum(-1, keepdim=True).expand(-1, SIDES).float()
        if i not in ends or record["exact"].get(epoch + 1) is None:
            continue
        window = [e for e in range(epoch - memory + 1, epoch + 1) if e in tops]
        pooled = torch.cat([tops[e] for e in window], dim=-1).sort(dim=-1, descending=True)
        total = sum(counts[e] for e in window)  # (n, 2)
        # torch.quantile's linear interpolation at 1 - alpha, counted from the top.
        position = (1 - alpha) * (total - 1)
        low = position.floor()
        frac = position - low
        from_top = (total - 1 - low).long().clamp(0, pooled.values.shape[-1] - 1)
        v_low = pooled.values.gather(-1, from_top.unsqueeze(-1)).squeeze(-1)
        v_high = pooled.values.gather(-1, (from_top - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        lam = (v_low + frac * (v_high - v_low)).t()  # (2, n)
        out.scores.append(score(lam, record["exact"][epoch + 1], epoch + 1))
    return out


def main(argv: list[str] | None = None) -> list[Replay]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", help="files written by fn_study.py --record")
    parser.add_argument(
        "--rule",
        action="append",
        default=None,
        help='a rule and its settings, e.g. "tail step_floor=0.1" (repeatable; default: '
        "tail and reference)",
    )
    parser.add_argument("--pooled", type=int, nargs="*", default=[1, 3, 100])
    parser.add_argument(
        "--column", default="lambda", help="state column scored (default: the threshold)"
    )
    parser.add_argument("--epochs", type=int, nargs="*", help="epochs to print (default: last)")
    opts = parser.parse_args(argv)
    # The health warnings are the training run's business; here the table says it all.
    logging.getLogger("glofnd_hf").setLevel(logging.ERROR)
    rules = [parse_rule(r) for r in (opts.rule or ["tail", "reference"])]
    replays = []
    for path in opts.records:
        record = torch.load(path, weights_only=False)
        ratios = exact_rule_over_alpha(record)
        runs = [replay_rule(record, name, o, opts.column, ratios) for name, o in rules]
        runs += [replay_pooled(record, m) for m in opts.pooled]
        last = max(s.epoch for s in runs[0].scores)
        show = set(opts.epochs or [last])
        print(f"\n{path} (alpha {record['alpha']}, N {record['num_samples']})")
        print(
            "| rule | epoch | median error | MAE | corr. | mean offset | filtered / alpha "
            "| fresh / alpha | exact rule / alpha |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for run in runs:
            for s in run.scores:
                if s.epoch in show:
                    ratios = [s.filtered_over_alpha, s.fresh_over_alpha, s.exact_over_alpha]
                    f = " | ".join("" if r is None else f"{r:.2f}" for r in ratios)
                    print(
                        f"| {run.name} | {s.epoch} | {s.median_error:.4f} | {s.mae:.4f} | "
                        f"{s.correlation:.3f} | {s.mean_offset:+.4f} | {f} |"
                    )
        replays += runs
    return replays


if __name__ == "__main__":
    main()
