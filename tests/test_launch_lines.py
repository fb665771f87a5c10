"""Every ``accelerate launch`` line the docs and recipes show runs as written.

The lines are read from README.md, docs/*.md and the comments at the top of the recipes. Each
distinct launch form (how the training program is named: ``-m MODULE``, a script path, or
``--no_python PROGRAM``) is run once for real: two CPU processes
(``recipes/accelerate/cpu_2proc.yaml``), the line's recipe when it runs offline (otherwise the
demo recipe), a few steps and a few evaluation samples. GPU configs, process counts and
external data are what a CPU test cannot have; the launch form is what failed before
(``accelerate launch glofnd-train ...`` cannot run a console script by name).
"""

from __future__ import annotations

import json
import re
import sys

import pytest
from launch import ROOT, free_port, run_process_group, worker_env
from test_docs import DOC_FILES, SHELL_LANGS, Block, parse_blocks, shell_commands

CPU_CONFIG = "recipes/accelerate/cpu_2proc.yaml"
OFFLINE_RECIPES = {"recipes/demo.yaml"}  # the recipes that need no download
DEFAULT_RECIPE = "recipes/demo.yaml"


def _recipe_comment_blocks() -> list[Block]:
    """The launch lines in the comments at the top of each recipe (with their backslash
    continuations), as shell blocks."""
    blocks = []
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        lines, continued = [], False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if continued or text.startswith("accelerate launch"):
                lines.append(text)
                continued = text.endswith("\\")
                if not continued:
                    where = str(path.relative_to(ROOT))
                    blocks.append(Block(where, number, "bash", "\n".join(lines), None))
                    lines = []
    return blocks


def documented_launch_lines() -> list[tuple[str, list[str]]]:
    """``(where, argv after 'accelerate launch')`` of every documented launch line."""
    found = []
    blocks = [b for doc in DOC_FILES for b in parse_blocks(doc.read_text(), doc.name)]
    for block in blocks + _recipe_comment_blocks():
        if block.lang not in SHELL_LANGS:
            continue
        for argv in shell_commands(block):
            if argv[:2] == ["accelerate", "launch"]:
                found.append((block.where, argv[2:]))
    return found


def launch_form(args: list[str]) -> tuple[tuple[str, ...], str]:
    """How a line names the program (``("-m", MODULE)``, ``("--no_python", PROG)`` or
    ``(SCRIPT,)``), and the recipe to run it with here."""
    from accelerate.commands.launch import launch_command_parser

    # Shell variables ($NODE_RANK, $MASTER_ADDR) stand for values a test has no use for.
    opts = launch_command_parser().parse_args(["0" if a.startswith("$") else a for a in args])
    if opts.module:
        form: tuple[str, ...] = ("-m", opts.training_script)
    elif opts.no_python:
        form = ("--no_python", opts.training_script)
    else:
        form = (opts.training_script,)
    recipes = [a for a in opts.training_script_args if a.endswith((".yaml", ".yml"))]
    recipe = recipes[0] if recipes and recipes[0] in OFFLINE_RECIPES else DEFAULT_RECIPE
    return form, recipe


LINES = documented_launch_lines()
FORMS = sorted({launch_form(args) for _, args in LINES})


def test_the_docs_show_launch_lines_of_a_form_accelerate_runs():
    where = {w.split(":")[0] for w, _ in LINES}
    assert {"README.md", "multi-gpu.md", CPU_CONFIG} <= where, where
    for place, args in LINES:
        form, _ = launch_form(args)
        # accelerate runs `python SCRIPT`: a console script name there cannot run.
        assert form[0] in ("-m", "--no_python") or form[0].endswith(".py"), (place, form)


@pytest.mark.parametrize(("form", "recipe"), FORMS, ids=[" ".join(f) for f, _ in FORMS])
def test_each_documented_launch_form_trains_under_two_processes(tmp_path, form, recipe):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_CONFIG]
    cmd += ["--main_process_port", str(free_port()), *form, recipe]
    cmd += ["--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8"]
    cmd += ["--max_train_samples", "32", "--max_eval_samples", "24", "--save_strategy", "no"]
    cmd += ["--logging_steps", "1", "--per_device_eval_batch_size", "8"]
    proc = run_process_group(cmd, worker_env(), timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((out / "zero_shot_results.json").read_text())
    assert set(results) == {"before", "after"}
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    # The evaluation is shared by the two processes: one set of progress bars, before and
    # after training (each process evaluating alone drew two of each).
    bars = re.findall(r"embedding images:\s+0%", proc.stderr)
    assert len(bars) == 2, proc.stderr[-3000:]
