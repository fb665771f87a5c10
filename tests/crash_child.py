"""``glofnd-train`` in a child process that SIGKILLs itself at a chosen point (crash tests).

``python tests/crash_child.py CONFIG.yaml [--flag value ...]`` runs ``glofnd-train``; the
environment variable ``GLOFND_KILL`` picks where the process dies, as an OOM kill or a lost
node would end it (no cleanup, no flush, nothing after). ``--serve`` turns the script into a
fork server for many such runs (see :func:`serve`). Kill points:

* ``step:K`` - at the end of optimizer step K, before anything of step K is saved;
* ``saved:K`` - right after checkpoint K is complete (at an epoch end: an epoch boundary);
* ``state:K`` - inside the per-sample state write of checkpoint K: the temporary file is
  written, the rename has not happened;
* ``trainer_state:K`` - inside checkpoint K, before its ``trainer_state.json`` is written
  (weights and optimizer are on disk).

Deterministic and fast: no timing is involved.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    kind, _, step_text = point.partition(":")
    step = int(step_text)
    folder = f"checkpoint-{step}"

    if kind in ("step", "saved"):
        from transformers import TrainerCallback

        import glofnd_hf.cli.train as cli

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if kind == "step" and state.global_step == step:
                    _die()

        base = cli.GloFNDTrainer

        class Trainer(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(Kill())

            def _save_checkpoint(self, model, trial):
                super()._save_checkpoint(model, trial)
                if kind == "saved" and self.state.global_step == step:
                    _die()

        cli.GloFNDTrainer = Trainer
    elif kind == "state":
        replace = os.replace

        def killing_replace(src, dst, *args, **kwargs):
            if os.path.basename(os.path.dirname(os.fspath(dst))) == folder:
                _die()  # the temporary file is written and flushed, not yet renamed
            return replace(src, dst, *args, **kwargs)

        os.replace = killing_replace  # this process only: it dies or ends its one run
    elif kind == "trainer_state":
        from transformers import TrainerState

        save = TrainerState.save_to_json

        def killing_save(self, json_path):
            if os.path.basename(os.path.dirname(json_path)) == folder:
                _die()
            return save(self, json_path)

        TrainerState.save_to_json = killing_save
    else:
        raise SystemExit(f"unknown GLOFND_KILL {point!r}")


def serve() -> None:
    """Fork server: import everything once, then run each request (a JSON line on stdin:
    ``{"argv": [...], "kill": "step:3" | null, "log": PATH, "timeout": SECONDS}``) in a
    forked child; answer with a JSON line ``{"exit": CODE}`` (``-9``: killed by SIGKILL,
    ``"timeout"``: still running after the timeout, then killed). Spares every run the
    seconds of importing transformers and building the data."""
    import functools
    import json
    import time
    import traceback

    import glofnd_hf.cli.train as cli

    # The data (a pure function of its arguments) is built once and shared by the children.
    cli.load_image_text_dataset = functools.lru_cache(maxsize=None)(cli.load_image_text_dataset)
    cli.load_image_text_dataset("glofnd-digits", None, "train")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if request.get("kill"):
                    install(request["kill"])
                result = cli.main(request["argv"])
                code = result if isinstance(result, int) else 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - reported in the log, exit status 1
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + float(request.get("timeout", 300))
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:  # a hang: end it, and say so
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.02)
        code = "timeout" if status is None else os.waitstatus_to_exitcode(status)
        print(json.dumps({"exit": code}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
        sys.exit(0)
    if os.environ.get("GLOFND_KILL"):
        install(os.environ["GLOFND_KILL"])
    from glofnd_hf.cli.train import main

    sys.exit(main(sys.argv[1:]))
