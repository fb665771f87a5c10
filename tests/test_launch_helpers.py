"""The test launcher's own behaviour: a gloo teardown abort is run once more, nothing else."""

import sys

from launch import GLOO_TEARDOWN_ABORT, _with_new_port, run_process_group, worker_env

# Fails (with the given message) on its first run, succeeds on later ones.
FLAKY = (
    "import pathlib, sys\n"
    "runs = pathlib.Path(sys.argv[1]); n = len(runs.read_text()) if runs.exists() else 0\n"
    "runs.write_text('x' * (n + 1))\n"
    "if n == 0:\n"
    "    sys.stderr.write(sys.argv[2]); sys.exit(1)\n"
)


def test_a_gloo_teardown_abort_is_run_once_more(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-c", FLAKY, str(runs), GLOO_TEARDOWN_ABORT]
    proc = run_process_group(cmd, worker_env(), timeout=60)
    assert proc.returncode == 0 and runs.read_text() == "xx"


def test_other_failures_are_not_run_again(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-c", FLAKY, str(runs), "Traceback: a real error"]
    proc = run_process_group(cmd, worker_env(), timeout=60)
    assert proc.returncode == 1 and runs.read_text() == "x"


def test_a_second_run_gets_a_new_port():
    cmd = ["torchrun", "--master_port", "1", "w.py", "--main_process_port", "2"]
    new = _with_new_port(cmd)
    assert new[0] == "torchrun" and new[3] == "w.py"
    assert new[2] != "1" and new[5] != "2" and int(new[2]) > 0
