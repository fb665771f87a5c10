"""How every command answers a user error or a Hub/network failure: one line on stderr,
``PROG: error: MESSAGE``, and exit status 2 (as argparse does for bad flags), without a
traceback. ``--debug`` (or ``GLOFND_DEBUG=1``) prints the traceback first.

User errors are what the package raises for bad input (``ValueError``: configuration, data,
state files, repo ids), missing or unwritable files (``OSError``), and failures of the Hub
or the network (huggingface_hub's errors, the HTTP client's). Anything else is a bug or a
resource problem (``RuntimeError`` such as running out of memory) and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence

__all__ = ["DEBUG_FLAG", "UsageError", "error_line", "is_user_error", "run_cli"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "GLOFND_DEBUG"
DEBUG_HELP = "on an error, print the traceback too (also: GLOFND_DEBUG=1)"
# Modules whose exceptions are network or Hub failures (looked up only once imported).
_NETWORK_ERRORS = (
    ("httpx2", "HTTPError"),
    ("httpx", "HTTPError"),
    ("requests", "RequestException"),
    ("urllib3.exceptions", "HTTPError"),
)


class UsageError(ValueError):
    """A command line or input the command cannot use (the message says what to change)."""


def _network_error_types() -> tuple[type[BaseException], ...]:
    found = []
    for module, name in _NETWORK_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _is_hub_error(err: BaseException) -> bool:
    return type(err).__module__.startswith(("huggingface_hub", "datasets.exceptions"))


def _is_network_error(err: BaseException) -> bool:
    return _is_hub_error(err) or isinstance(err, (ConnectionError, *_network_error_types()))


def is_user_error(err: BaseException) -> bool:
    """Bad input, a missing file, or a Hub/network failure (answered with one line)."""
    return isinstance(err, (ValueError, OSError)) or _is_network_error(err)


def _hint(err: BaseException) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return " (check the access token: HF_TOKEN or `hf auth login`)"
    if _is_network_error(err) and status is None and "Offline" not in type(err).__name__:
        return " (is the network reachable?)"
    return ""


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def _without_worker_traceback(message: str) -> str:
    """A DataLoader worker's error as torch re-raises it carries the worker's whole
    traceback in its message: keep the error itself and say where it happened."""
    if _WORKER_TRACEBACK not in message:
        return message
    lines = message.split(_WORKER_TRACEBACK, 1)[1].strip("\n").splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith(" ")]
    error = "\n".join(lines[frames[-1] + 1 :] if frames else lines)
    kind, sep, text = error.partition(": ")
    named = sep and all(part.isidentifier() for part in kind.split("."))
    error = text if named else error  # the exception type is not part of the message
    return f"{error} (in a DataLoader worker)"


def error_line(prog: str, err: BaseException) -> str:
    """``PROG: error: MESSAGE`` on one line (the message's own line breaks collapsed)."""
    message = " ".join(_without_worker_traceback(str(err)).split())
    if not message or _is_network_error(err) or type(err) in (OSError, ConnectionError):
        message = f"{type(err).__name__}: {message}".rstrip(": ")
    return f"{prog}: error: {message}{_hint(err)} [{DEBUG_FLAG} shows the traceback]"


def split_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without a bare ``--debug`` (one not followed by a value: ``--debug
    underflow_overflow`` stays, it is transformers' own setting), and whether debugging is
    on (the flag or ``GLOFND_DEBUG``)."""
    argv = list(argv)
    debug = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")
    kept: list[str] = []
    for i, arg in enumerate(argv):
        bare = i + 1 == len(argv) or argv[i + 1].startswith("-")
        if arg == DEBUG_FLAG and bare:
            debug = True
        else:
            kept.append(arg)
    return kept, debug


def run_cli(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None) -> int:
    """Run ``body(argv)`` (``sys.argv[1:]`` when None); a user error exits with status 2
    after one line on stderr (``SystemExit``, as argparse's usage errors)."""
    argv, debug = split_debug_flag(sys.argv[1:] if argv is None else argv)
    try:
        return int(body(argv) or 0)
    except Exception as err:
        if not is_user_error(err):
            raise
        if debug:
            traceback.print_exc()
        sys.stderr.write(error_line(prog, err) + "\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
