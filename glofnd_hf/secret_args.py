"""Access tokens never reach the disk or the Hub.

* Training arguments that name a secret (``hub_token``, any ``*_token``, ``*_secret``,
  ``*_password``, ``*_api_key``) are left out whenever the arguments are pickled: the
  Trainer's ``training_args.bin`` (``torch.save(self.args, ...)`` in every checkpoint, the
  final folder and the folder transformers pushes during training) holds ``None`` there, while
  the running process keeps the token (:class:`SecretsNotPickled`).
* :func:`find_secrets` looks into files before an upload: pickled arguments that still hold
  a token (files written by other versions or tools), and Hugging Face access tokens
  (``hf_...``, or the token of this session) anywhere in a file.
"""

from __future__ import annotations

import copy
import io
import os
import pickletools
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["SecretsNotPickled", "find_secrets", "is_secret_name", "known_tokens"]

_SECRET_NAME_RE = re.compile(
    r"(^|_)(token|secret|password|passwd|api_key|apikey|access_key|credentials?)$", re.I
)
_SPECIAL_TOKEN_RE = re.compile(
    r"(^|_)(pad|bos|eos|unk|sep|cls|mask|special|start|end)_token$", re.I
)
#: A Hugging Face user access token.
_HF_TOKEN_RE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_CHUNK = 16 << 20


def is_secret_name(name: str) -> bool:
    """A setting whose value is a credential (``hub_token``, ``wandb_api_key``, ...); a
    tokenizer's special tokens (``pad_token``, ...) are not."""
    return bool(_SECRET_NAME_RE.search(name)) and not _SPECIAL_TOKEN_RE.search(name)


class SecretsNotPickled:
    """Mixin for argument dataclasses: pickling (``torch.save``) drops the values of
    secret-named attributes; copies made in the process keep them."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name, value in state.items():
            if is_secret_name(name) and value is not None:
                state[name] = None
        return state

    def __copy__(self) -> Any:
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new


def known_tokens(explicit: Iterable[str | None] = ()) -> list[str]:
    """Tokens of this session to look for: ``explicit`` ones, ``HF_TOKEN`` /
    ``HUGGING_FACE_HUB_TOKEN`` and the token saved by ``hf auth login``."""
    tokens = [t for t in explicit if t]
    tokens += [os.environ.get(v) for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        tokens.append(get_token())
    except Exception:  # noqa: BLE001 - no saved token, or an older huggingface_hub
        pass
    return sorted({t for t in tokens if t and len(t) >= 8})


def find_secrets(path: str | os.PathLike, tokens: Iterable[str] = ()) -> list[str]:
    """What in the file at ``path`` is a secret (empty: nothing found): pickled arguments
    with a secret-named attribute set (``hub_token='...'``), a Hugging Face access token, or
    one of ``tokens``. Values are never part of the answer."""
    path = Path(path)
    found: list[str] = []
    if path.suffix.lower() in _PICKLE_SUFFIXES or path.name == "training_args.bin":
        found += [f"the pickled setting {name!r}" for name in _pickled_secrets(path)]
    needles = [t.encode() for t in tokens if t]
    if _scan(path, needles):
        found.append("an access token")
    return found


def _scan(path: Path, needles: list[bytes]) -> bool:
    """A Hugging Face token or one of ``needles`` in the file's bytes (read in chunks,
    overlapping so that nothing is missed at a boundary)."""
    overlap = max([64, *(len(n) for n in needles)])
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            data = tail + chunk
            if _HF_TOKEN_RE.search(data) or any(n in data for n in needles):
                return True
            tail = data[-overlap:]
    return False


def _pickles(path: Path) -> list[bytes]:
    """The pickles of a file: itself, or the ``*.pkl`` members of a ``torch.save`` zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    return [path.read_bytes()]


def _pickled_secrets(path: Path) -> list[str]:
    """Secret-named strings followed by a non-empty string in the pickle opcodes (a dict
    entry ``name: value`` of a pickled object's state, memo references resolved); nothing
    is unpickled."""
    names: list[str] = []
    for data in _pickles(path):
        values: list[Any] = []  # the value each opcode pushes: a str, or None for others
        memo: dict[int, Any] = {}
        try:
            for op, arg, _ in pickletools.genops(io.BytesIO(data)):
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = values[-1] if values else None
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = values[-1] if values else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    values.append(memo.get(arg))
                else:
                    values.append(arg if "UNICODE" in op.name and isinstance(arg, str) else None)
        except Exception:  # noqa: BLE001 - not a pickle (or cut): the byte scan still applies
            pass
        for name, value in zip(values, values[1:], strict=False):
            if isinstance(name, str) and is_secret_name(name) and isinstance(value, str):
                if value.strip():
                    names.append(name)
    return sorted(set(names))
