"""The report as one self-contained HTML page: inline CSS, images as ``data:`` URIs, no
scripts and no external resources (it opens offline, and can be mailed as one file)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from ..fnd.interface import SIDES
from .thumbnails import data_uri

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table.meta td{padding:2px 10px 2px 0;vertical-align:top}
table.stats{border-collapse:collapse}table.stats td,table.stats th{border:1px solid #ddd;
padding:3px 8px;text-align:right}
.anchor{display:flex;gap:12px;align-items:flex-start;margin:.5em 0}
.side{margin:.6em 0 1.2em 0}.side p{margin:.2em 0 .4em 0;font-size:.9em}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{width:124px;border:2px solid #bbb;border-radius:4px;padding:4px;font-size:11px}
.card.detected{border-color:#c0392b}.card.anchor{border-color:#222}
img.thumb{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;
display:block;margin:0 auto;background:#eee}
.bar{position:relative;height:7px;background:#eee;margin:3px 0}
.bar .fill{position:absolute;left:0;top:0;bottom:0;background:#7f8c8d}
.card.detected .bar .fill{background:#c0392b}
.bar .lam{position:absolute;top:-2px;bottom:-2px;width:2px;background:#000}
.same{color:#1e8449;font-weight:bold}.other{color:#999}
.caption{color:#444;word-wrap:break-word}
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def _card(sample: dict[str, Any], kind: str, thumb: str, side: dict, low: float) -> str:
    sim = sample["similarity"]
    width = 100 * max(0.0, (sim - low) / (1.0 - low))
    lam = 100 * max(0.0, (side["threshold"] - low) / (1.0 - low))
    label = ""
    if "same_label" in sample:
        label = (
            '<span class="same" title="same label as the anchor">✓ same label</span>'
            if sample["same_label"]
            else '<span class="other" title="another label">✗ other label</span>'
        )
    return (
        f'<div class="card {kind}"><img class="thumb" src="{thumb}" alt="#{sample["index"]}">'
        f"<div><b>#{sample['index']}</b> s={sim:.3f} {label}</div>"
        f'<div class="bar" title="similarity {sim:.4f}, threshold {side["threshold"]:.4f}">'
        f'<div class="fill" style="width:{width:.1f}%"></div>'
        f'<div class="lam" style="left:{lam:.1f}%"></div></div>'
        f'<div class="caption">{escape(sample["caption"])}</div></div>'
    )


def _side(anchor: dict[str, Any], name: str, thumbs: dict[int, str]) -> str:
    side = anchor["sides"][name]
    other = "texts" if name == "image" else "images"
    shown = side["detected"] + side["below"]
    low = min([c["similarity"] for c in shown] + [side["threshold"]]) - 0.02
    low = max(-1.0, min(low, 0.98))
    visits = f", {side['visits']} visits" if side.get("visits") is not None else ""
    head = (
        f"<p><b>{name} side</b>: {name} #{anchor['index']} against the {other} of the other "
        f"samples. Threshold <b>{side['threshold']:.4f}</b>{visits}; own pair "
        f"s={side['positive_similarity']:.3f}; <b>{side['num_detected']}</b> detected of "
        f"{side['num_negatives']} negatives (red: shown {len(side['detected'])}), then the "
        f"{len(side['below'])} nearest below the threshold (grey).</p>"
    )
    cards = [_card(c, "detected", thumbs[c["row"]], side, low) for c in side["detected"]]
    cards += [_card(c, "below", thumbs[c["row"]], side, low) for c in side["below"]]
    return f'<div class="side">{head}<div class="cards">{"".join(cards)}</div></div>'


def _summary(report: dict[str, Any], summary_png: bytes | None) -> str:
    summary = report["summary"]
    rows = [
        ("threshold, median", lambda s: s["threshold"].get("p50")),
        ("exact quantile, median", lambda s: s["exact_quantile"].get("p50")),
        ("|threshold - exact|, median", lambda s: s["median_abs_threshold_error"]),
        ("detected per anchor, mean", lambda s: s["detected_per_anchor"].get("mean")),
        ("anchors without detections", lambda s: s["anchors_without_detections"]),
        ("precision (labels)", lambda s: s.get("labels", {}).get("precision")),
        ("recall (labels)", lambda s: s.get("labels", {}).get("recall")),
        ("exact rule precision", lambda s: s.get("labels", {}).get("exact_quantile_precision")),
        ("exact rule recall", lambda s: s.get("labels", {}).get("exact_quantile_recall")),
    ]
    header = "".join(f"<th>{side}</th>" for side in SIDES)
    body = "".join(
        f"<tr><th style='text-align:left'>{name}</th>"
        + "".join(f"<td>{_fmt(get(summary['sides'][side]))}</td>" for side in SIDES)
        + "</tr>"
        for name, get in rows
    )
    scope = "every anchor" if summary["all_anchors"] else "a random subset of anchors"
    html = (
        f"<h2>Whole data set</h2><p>{scope} ({summary['num_anchors']}), each against every "
        f"sample of the data set.</p><table class='stats'><tr><th></th>{header}</tr>{body}"
        "</table>"
    )
    if summary_png:
        uri = "data:image/png;base64," + base64.b64encode(summary_png).decode("ascii")
        html += f'<p><img src="{uri}" alt="summary plots" style="max-width:100%"></p>'
    return html


def render_html(
    report: dict[str, Any], thumbs: dict[int, Any], summary_png: bytes | None = None
) -> str:
    """The page of ``report``; ``thumbs``: row -> PIL thumbnail of every listed sample."""
    uris = {row: data_uri(image) for row, image in thumbs.items()}
    detector = report["detector"]
    data = report["data"]
    meta = [
        ("checkpoint", report["checkpoint"]),
        (
            "model",
            f"{report['model']['name']} ({report['model']['class']}, {report['model']['family']})",
        ),
        ("data", f"{data.get('source')} [{data.get('split') or '-'}], {data['num_rows']} rows"),
        ("detector", f"{detector['name']}, alpha {detector['alpha']:g}: {detector['thresholds']}"),
        ("labels", data.get("label_column") or "none"),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>glofnd-inspect: {escape(str(report['checkpoint']))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Detected false negatives</h1>",
        "<table class='meta'>"
        + "".join(f"<tr><td><b>{k}</b></td><td>{escape(str(v))}</td></tr>" for k, v in meta)
        + "</table>",
        "<p>A negative of an anchor is every other sample of the data set; it is a detected "
        "false negative when its similarity exceeds the anchor's threshold (the bar's black "
        "mark). Similarities use the evaluation transform and each row's first caption.</p>",
        _summary(report, summary_png),
    ]
    for anchor in report["anchors"]:
        label = f", label {escape(str(anchor['label']))}" if "label" in anchor else ""
        parts.append(
            f"<h2 id='anchor-{anchor['index']}'>Anchor #{anchor['index']}</h2>"
            f'<div class="anchor"><div class="card anchor"><img class="thumb" '
            f'src="{uris[anchor["row"]]}" alt="#{anchor["index"]}"></div>'
            f"<div><b>{escape(anchor['caption'])}</b><br>dataset index {anchor['index']}, "
            f"row {anchor['row']}{label}</div></div>"
        )
        parts.extend(_side(anchor, side, uris) for side in SIDES)
    parts.append("</body></html>")
    return "\n".join(parts)
