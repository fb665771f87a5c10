"""Start multi-process launchers from tests without leaving orphans behind."""

import os
import signal
import socket
import subprocess
import sys
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


# What gloo prints when it aborts a worker (SIGABRT) while the process group is torn down,
# after the work is done: seen about once in ten full runs on 2 shared cores, even with a
# barrier before the teardown.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_process_group(cmd, env, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the launcher *and* its workers. A run
    that fails with gloo's teardown abort is run once more: a real failure repeats."""
    result = _run_once(cmd, env, timeout, cwd)
    if result.returncode != 0 and GLOO_TEARDOWN_ABORT in result.stderr:
        print(f"gloo aborted at teardown, running once more: {cmd[:6]}", file=sys.stderr)
        result = _run_once(_with_new_port(cmd), env, timeout, cwd)
    return result


def _with_new_port(cmd: list[str]) -> list[str]:
    """``cmd`` with a fresh rendezvous port (the last run's may still be held by the OS)."""
    cmd = list(cmd)
    for i, arg in enumerate(cmd[:-1]):
        if arg in ("--master_port", "--main_process_port"):
            cmd[i + 1] = str(free_port())
    return cmd


def _run_once(cmd, env, timeout: float, cwd=None) -> subprocess.CompletedProcess:
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
        _kill_all(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_all(pid: int) -> None:
    """Kill the launcher ``pid``, its process group and every process below it: torch's
    launcher starts its workers in sessions of their own, which killing the group misses
    (they would live on, holding the output pipes open, and the test would block)."""
    import psutil

    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        below = []
    os.killpg(pid, signal.SIGKILL)
    for child in below:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def run_torchrun_workers(script, nproc: int, out, *extra: str, timeout: float = 300) -> list:
    """Run ``script`` (a worker under tests/distributed) in ``nproc`` gloo processes with
    ``--out out``; returns what each rank saved to ``{out}.rank{r}``."""
    import torch

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(TESTS / "distributed" / script),
        "--out",
        str(out),
        *extra,
    ]
    proc = run_process_group(cmd, worker_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(nproc)]
