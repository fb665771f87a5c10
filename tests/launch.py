"""Start multi-process launchers from tests without leaving orphans behind."""

import os
import signal
import socket
import subprocess
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of launched workers: one thread each, and this checkout's package
    and test helpers first on the path (not whatever copy the virtual environment holds)."""
    path = [str(TESTS), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(path), **extra}


def run_process_group(cmd, env, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the launcher *and* its workers."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
