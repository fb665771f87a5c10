"""A real CLIP byte-level BPE tokenizer with a small vocabulary, built offline (tiny models)."""

from __future__ import annotations

import functools
import gzip
import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "build_small_clip_tokenizer",
    "clip_bpe_merges",
    "make_clip_tokenizer",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def clip_bpe_merges() -> tuple[tuple[str, str], ...]:
    """All CLIP BPE merges, in rank order, from the vocabulary file open_clip ships."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Same slice as CLIP's SimpleTokenizer: skip the version header, keep 49152 - 256 - 2 merges.
    lines = lines[1 : 49152 - 256 - 2 + 1]
    return tuple(tuple(line.split()) for line in lines)  # type: ignore[misc]


def _clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary for (a subset of) its merges: bytes, bytes + '</w>', merges, specials."""
    from open_clip.tokenizer import bytes_to_unicode

    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}


def _bpe_ranks_used(word: str, ranks: Mapping[tuple[str, str], int]) -> set[int]:
    """Ranks of the merges that byte-level BPE applies to one pre-tokenised word."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used: set[int] = set()
    while len(parts) > 1:
        best = min(
            (
                (ranks.get(pair, math.inf), i)
                for i, pair in enumerate(zip(parts, parts[1:], strict=False))
            ),
        )
        if best[0] == math.inf:
            break
        used.add(int(best[0]))
        a, b = parts[best[1]], parts[best[1] + 1]
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def make_clip_tokenizer(merges: Sequence[tuple[str, str]], context_length: int):
    """``transformers.CLIPTokenizer`` over CLIP's vocabulary cut down to ``merges``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=_clip_vocab(merges),
        merges=[tuple(m) for m in merges],
        model_max_length=context_length,
    )


def build_small_clip_tokenizer(
    texts: Iterable[str] | None = None, *, num_merges: int = 1000, context_length: int = 32
):
    """A real CLIP byte-level BPE tokenizer (``transformers.CLIPTokenizer``), small vocabulary.

    Keeps the ``num_merges`` most frequent CLIP merges plus every merge CLIP applies to ``texts``,
    in CLIP's rank order, so ``texts`` tokenise exactly as with the full CLIP tokenizer while any
    other text still tokenises (into smaller pieces, down to bytes). Built offline from the
    ``bpe_simple_vocab_16e6.txt.gz`` file in the open_clip package.
    """
    all_merges = clip_bpe_merges()
    keep = set(range(min(num_merges, len(all_merges))))
    texts = [t for t in (texts or []) if t]
    if texts:
        ranks = {m: i for i, m in enumerate(all_merges)}
        base = make_clip_tokenizer([], context_length).backend_tokenizer
        for text in texts:
            normalized = base.normalizer.normalize_str(text)
            for word, _ in base.pre_tokenizer.pre_tokenize_str(normalized):
                if word:
                    keep |= _bpe_ranks_used(word, ranks)
    merges = [all_merges[i] for i in sorted(keep)]
    return make_clip_tokenizer(merges, context_length)
