"""The docs cannot rot: README.md and docs/*.md are checked against the code.

What is checked, without running any job (no network, no GPU, no data):

* ```bash / ```sh / ```shell / ```console blocks: every command line that invokes one of our
  programs (the console scripts of pyproject.toml, ``python -m glofnd_hf...``,
  ``accelerate launch ... -m MODULE`` / ``--no_python SCRIPT``, ``python benchmarks/X.py``)
  has its arguments parsed by that program's real parser, so a renamed or removed flag fails.
  A program that exposes ``build_parser()`` is parsed with it; otherwise its entry function
  is called with argument parsing intercepted (``ArgumentParser.parse_args`` and
  ``HfArgumentParser.parse_args_into_dataclasses`` stop the call once they have parsed, so
  ``glofnd-train``'s YAML file and flags are validated by its own code). ``accelerate launch``
  options go through accelerate's own parser. ``make TARGET`` must name a Makefile target.
  Other programs (pip, img2dataset, ...) are left alone.
* Repository paths in commands and inline code (``recipes/...``, ``benchmarks/...``,
  ``glofnd_hf/...``, ...) must exist.
* ```python blocks: they must parse; every ``glofnd_hf`` import must resolve, and calls of
  imported callables may only use keyword arguments their signature accepts.
* ```yaml blocks are ``glofnd-train`` configs: parsed as one (unknown keys fail).
* ```json blocks must be valid JSON.
* Inline ``glofnd_hf.x.y`` references must resolve; relative links and their #anchors must
  point at something that exists; every page of docs/ is linked from README.md and
  docs/index.md.

To leave a block out (illustrative only, or its program cannot be checked), put this on the
line right before its opening fence, with the reason:

    <!-- docs-test: skip: why this block cannot be checked -->
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SHELL_LANGS = {"bash", "sh", "shell", "console"}
SKIP_RE = re.compile(r"^\s*<!--\s*docs-test:\s*skip\b:?\s*(.*?)\s*-->\s*$")
FENCE_RE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
REPO_PATH_RE = re.compile(r"^(?:glofnd_hf|recipes|benchmarks|model_cards|tests|docs)/[\w./*-]*$")
INLINE_CODE_RE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK_RE = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
SEPARATORS = {"&&", "||", ";", "|"}


# ---------------------------------------------------------------------------------------
# Markdown


@dataclasses.dataclass
class Block:
    path: str  # relative to ROOT, for messages
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the reason given by a skip marker, "" when it gave none

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def parse_blocks(text: str, path: str = "<doc>") -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3).lower()
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        skip_match = SKIP_RE.match(lines[j]) if j >= 0 else None
        body: list[str] = []
        k = i + 1
        while k < len(lines) and not lines[k].strip().startswith(fence[:3]):
            body.append(lines[k])
            k += 1
        blocks.append(
            Block(path, i + 1, lang, "\n".join(body), skip_match.group(1) if skip_match else None)
        )
        i = k + 1
    return blocks


def prose(text: str) -> str:
    """The text outside fenced blocks (blocks replaced by blank lines, so lines keep count)."""
    out: list[str] = []
    in_block = None
    for line in text.splitlines():
        m = FENCE_RE.match(line)
        if in_block is None and m:
            in_block = m.group(2)[:3]
            out.append("")
        elif in_block is not None and line.strip().startswith(in_block):
            in_block = None
            out.append("")
        else:
            out.append("" if in_block else line)
    return "\n".join(out)


def shell_commands(block: Block) -> list[list[str]]:
    """The commands of a shell block as argv lists (comments, prompts, continuations and
    leading VAR=value assignments removed; ``a && b`` gives two commands)."""
    lines = block.text.splitlines()
    if block.lang == "console":  # only the prompt lines are commands, the rest is output
        kept, cont = [], False
        for line in lines:
            if line.startswith("$ ") or cont:
                kept.append(line[2:] if line.startswith("$ ") and not cont else line)
                cont = line.rstrip().endswith("\\")
        lines = kept
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            joined.append(current + line)
            current = ""
    if current:
        joined.append(current)
    commands: list[list[str]] = []
    for line in joined:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                commands.append(argv)
                argv = []
            else:
                argv.append(token)
        commands.append(argv)
    result = []
    for argv in commands:
        while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
            argv = argv[1:]
        if argv:
            result.append(argv)
    return result


# ---------------------------------------------------------------------------------------
# Programs


class _Parsed(BaseException):
    """Raised by the patched parsers once the arguments parsed: nothing runs after. A
    BaseException, so that a program's own ``except Exception`` does not swallow it."""


@contextlib.contextmanager
def stop_after_parsing() -> Iterator[None]:
    from transformers import HfArgumentParser, training_args

    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, new: Any) -> None:
        patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    orig_parse_args = argparse.ArgumentParser.parse_args
    orig_dataclasses = HfArgumentParser.parse_args_into_dataclasses

    def parse_args(self, *args, **kwargs):
        raise _Parsed(orig_parse_args(self, *args, **kwargs))

    def parse_args_into_dataclasses(self, *args, **kwargs):
        raise _Parsed(orig_dataclasses(self, *args, **kwargs))

    patch(argparse.ArgumentParser, "parse_args", parse_args)
    patch(HfArgumentParser, "parse_args_into_dataclasses", parse_args_into_dataclasses)
    # The docs describe GPU runs (bf16: true); whether this machine has a bf16 GPU is not
    # the docs' concern.
    if hasattr(training_args, "is_torch_bf16_gpu_available"):
        patch(training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)
    try:
        yield
    finally:
        for owner, name, old in reversed(patches):
            setattr(owner, name, old)


def console_scripts() -> dict[str, str]:
    """``name -> module:function`` from pyproject.toml, so the test follows a moved CLI."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"]["scripts"])


def _load_target(target: str) -> tuple[Any, Callable[..., Any]]:
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    return module, getattr(module, func or "main")


def _load_script(path: Path) -> tuple[Any, Callable[..., Any] | None]:
    name = "_docs_test_" + re.sub(r"\W", "_", str(path.relative_to(ROOT)))
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        # `python DIR/x.py` puts DIR first on the path: the script's sibling imports resolve.
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    return module, getattr(module, "main", None)


def parse_with_program(
    module: Any, entry: Callable[..., Any] | None, prog: str, args: list[str]
) -> str | None:
    """Parse ``args`` as the program would; a message when they do not parse, else None."""
    stderr, stdout = io.StringIO(), io.StringIO()
    builder = getattr(module, "build_parser", None)
    old_argv = sys.argv
    sys.argv = [prog, *args]
    try:
        with (
            contextlib.redirect_stderr(stderr),
            contextlib.redirect_stdout(stdout),
            stop_after_parsing(),
        ):
            parser = builder() if callable(builder) else None
            if (
                isinstance(parser, argparse.ArgumentParser)
                and type(parser).__name__ != "HfArgumentParser"
            ):
                parser.parse_args(args)
            elif entry is None:
                return f"{prog}: no build_parser() and no main() to parse arguments with"
            elif inspect.signature(entry).parameters:
                entry(args)
            else:
                entry()
    except _Parsed:
        return None
    except SystemExit as e:
        if e.code in (0, None):  # --help
            return None
        detail = stderr.getvalue().strip().splitlines()[-1:] or [str(e.code)]
        return f"{prog} {' '.join(args)}: {detail[0]}"
    except Exception as e:  # a parser's ValueError, a missing module, ...
        return f"{prog} {' '.join(args)}: {type(e).__name__}: {e}"
    finally:
        sys.argv = old_argv
    return (
        f"{prog}: argument parsing was not intercepted (the program ran to the end); "
        "give its module a build_parser()"
    )


def _module_program(module_name: str, args: list[str]) -> str | None:
    scripts = {target.partition(":")[0]: name for name, target in console_scripts().items()}
    if module_name in scripts:
        return check_program(scripts[module_name], args)
    if not module_name.startswith(("glofnd_hf", "benchmarks")):
        return None  # not ours (pytest, pip, ...)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return f"python -m {module_name}: {e}"
    return parse_with_program(module, getattr(module, "main", None), module_name, args)


def check_program(prog: str, args: list[str]) -> str | None:
    scripts = console_scripts()
    if prog not in scripts:
        return f"{prog}: not a console script of pyproject.toml"
    try:
        module, entry = _load_target(scripts[prog])
    except (ImportError, AttributeError) as e:
        return f"{prog}: entry point {scripts[prog]} does not load: {e}"
    return parse_with_program(module, entry, prog, args)


def _check_accelerate(args: list[str]) -> list[str]:
    from accelerate.commands.launch import launch_command_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            opts = launch_command_parser().parse_args(args)
    except SystemExit:
        return [f"accelerate launch {' '.join(args)}: {stderr.getvalue().strip()}"]
    problems = []
    if opts.config_file and not (ROOT / opts.config_file).is_file():
        problems.append(f"accelerate config {opts.config_file} does not exist")
    script, script_args = opts.training_script, list(opts.training_script_args)
    if opts.module:
        problem = _module_program(script, script_args)
    elif opts.no_python:
        problem = check_program(script, script_args) if script in console_scripts() else None
    elif script.endswith(".py"):
        problem = _check_script(script, script_args)
    else:
        problem = (
            f"accelerate launch runs `python {script}`: use `-m MODULE` (e.g. -m "
            "glofnd_hf.cli.train) or `--no_python` for a console script"
        )
    return problems + ([problem] if problem else [])


def _check_script(path: str, args: list[str]) -> str | None:
    file = ROOT / path
    if not file.is_file():
        return f"{path} does not exist"
    if file.resolve().is_relative_to(ROOT / ".venv"):
        return None
    module, entry = _load_script(file)
    return parse_with_program(module, entry, path, args)


def _makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+)\s*:(?!=)", text, flags=re.M))


def check_command(argv: list[str]) -> list[str]:
    problems = [f"{t} does not exist" for t in argv if _missing_repo_path(t)]
    prog, args = Path(argv[0]).name, argv[1:]
    if prog in console_scripts() or prog.startswith("glofnd-"):
        problem = check_program(prog, args)
    elif prog == "accelerate" and args[:1] == ["launch"]:
        return problems + _check_accelerate(args[1:])
    elif re.fullmatch(r"python[\d.]*", prog):
        if args[:1] == ["-m"] and len(args) > 1:
            problem = _module_program(args[1], args[2:])
        elif args and args[0].endswith(".py"):
            problem = _check_script(args[0], args[1:])
        else:
            problem = None
    elif prog == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        known = _makefile_targets()
        problem = (
            "; ".join(f"make: no target {t!r} in the Makefile" for t in targets if t not in known)
            or None
        )
    else:
        problem = None  # not ours
    return problems + ([problem] if problem else [])


def _missing_repo_path(token: str) -> bool:
    token = token.rstrip("/.,:;")
    if not REPO_PATH_RE.match(token) or "{" in token:
        return False
    if "*" in token:
        return not any(ROOT.glob(token))
    return not (ROOT / token).exists()


# ---------------------------------------------------------------------------------------
# Python, YAML, JSON


def resolve_dotted(name: str) -> Any:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def check_python(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"python does not parse: {e}"]
    problems: list[str] = []
    bound: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("glofnd_hf"):
            try:
                module = importlib.import_module(node.module)
            except ImportError as e:
                problems.append(f"from {node.module} import ...: {e}")
                continue
            for alias in node.names:
                try:
                    obj = (
                        getattr(module, alias.name)
                        if hasattr(module, alias.name)
                        else importlib.import_module(f"{node.module}.{alias.name}")
                    )
                except ImportError:
                    problems.append(f"cannot import {alias.name!r} from {node.module}")
                    continue
                bound[alias.asname or alias.name] = obj
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("glofnd_hf"):
                    try:
                        importlib.import_module(alias.name)
                    except ImportError as e:
                        problems.append(f"import {alias.name}: {e}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in bound
            and callable(bound[node.func.id])
        ):
            try:
                signature = inspect.signature(bound[node.func.id])
            except (TypeError, ValueError):
                continue
            if any(isinstance(a, ast.Starred) for a in node.args):
                continue
            keywords = {k.arg: None for k in node.keywords if k.arg is not None}
            try:
                signature.bind_partial(*[None] * len(node.args), **keywords)
            except TypeError as e:
                problems.append(f"line {node.lineno}: {node.func.id}(...): {e}")
    return problems


def check_block(block: Block, tmp_dir: Path) -> list[str]:
    if block.lang in SHELL_LANGS:
        return [p for argv in shell_commands(block) for p in check_command(argv)]
    if block.lang in ("python", "py"):
        return check_python(block.text)
    if block.lang in ("yaml", "yml"):
        config = tmp_dir / f"docs_block_{block.line}.yaml"
        config.write_text(block.text)
        problem = check_program("glofnd-train", [str(config)])
        return [problem.replace(str(config), "<this yaml block>")] if problem else []
    if block.lang == "json":
        try:
            json.loads(block.text)
        except json.JSONDecodeError as e:
            return [f"json does not parse: {e}"]
    return []


def check_markdown(text: str, tmp_dir: Path, path: str = "<doc>") -> list[str]:
    """Every problem of one page's blocks (skip markers honoured)."""
    problems = []
    for block in parse_blocks(text, path):
        if block.skip == "":
            problems.append(f"{block.where}: a docs-test skip marker needs a reason")
        elif block.skip is None:
            problems += [f"{block.where}: {p}" for p in check_block(block, tmp_dir)]
    return problems


# ---------------------------------------------------------------------------------------
# Links


def github_slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose(page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def check_links(page: Path, text: str | None = None) -> list[str]:
    text = page.read_text() if text is None else text
    problems = []
    for lineno, line in enumerate(prose(text).splitlines(), 1):
        for target in LINK_RE.findall(line):
            if re.match(r"^[a-z][\w+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                problems.append(f"{page.name}:{lineno}: {target}: no such file")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.name}:{lineno}: {target}: no heading #{anchor}")
    return problems


# ---------------------------------------------------------------------------------------
# Tests


def _all_blocks() -> list[Block]:
    return [
        b
        for doc in DOC_FILES
        for b in parse_blocks(doc.read_text(), str(doc.relative_to(ROOT)))
        if b.lang in SHELL_LANGS | {"python", "py", "yaml", "yml", "json"}
    ]


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # doc commands use repository-relative paths


@pytest.mark.parametrize("block", _all_blocks(), ids=lambda b: f"{b.where}[{b.lang}]")
def test_doc_block(block: Block, tmp_path: Path, in_root: None) -> None:
    if block.skip is not None:
        assert block.skip, f"{block.where}: a docs-test skip marker needs a reason"
        pytest.skip(block.skip)
    problems = check_block(block, tmp_path)
    assert not problems, f"{block.where}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_and_paths(doc: Path) -> None:
    text = doc.read_text()
    problems = check_links(doc, text)
    for lineno, line in enumerate(prose(text).splitlines(), 1):
        for code in INLINE_CODE_RE.findall(line):
            code = code.strip()
            if _missing_repo_path(code):
                problems.append(f"{doc.name}:{lineno}: `{code}` does not exist")
            m = re.match(r"^(glofnd_hf(?:\.\w+)+)", code)
            if m:
                try:
                    resolve_dotted(m.group(1))
                except (ImportError, AttributeError):
                    problems.append(f"{doc.name}:{lineno}: `{m.group(1)}` does not resolve")
    assert not problems, "\n".join(problems)


def test_every_page_is_on_the_maps() -> None:
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    readme = ROOT / "README.md"
    index = ROOT / "docs" / "index.md"
    linked_from_readme = {
        Path(t.partition("#")[0]).name
        for t in LINK_RE.findall(readme.read_text())
        if t.startswith("docs/")
    }
    linked_from_index = {
        Path(t.partition("#")[0]).name
        for t in LINK_RE.findall(index.read_text())
        if "/" not in t and not t.startswith("#")
    }
    assert pages - {"index.md"} <= linked_from_readme, "pages missing from README's docs map"
    assert pages - {"index.md"} <= linked_from_index, "pages missing from docs/index.md"


@pytest.mark.parametrize("prog", sorted(console_scripts()))
def test_console_script_help(prog: str) -> None:
    """Every console script loads and answers --help (its help text formats)."""
    assert check_program(prog, ["--help"]) is None


# The checker itself must be able to fail.


def _problems(doc: str, tmp_path: Path) -> list[str]:
    return check_markdown(doc, tmp_path)


def test_checker_rejects_a_bogus_flag(tmp_path: Path, in_root: None) -> None:
    good = "```bash\nglofnd-train recipes/demo.yaml --num_train_epochs 1\n```\n"
    bad = "```bash\nglofnd-train recipes/demo.yaml --no_such_flag 1\n```\n"
    assert _problems(good, tmp_path) == []
    problems = _problems(bad, tmp_path)
    assert len(problems) == 1 and "no_such_flag" in problems[0]


@pytest.mark.parametrize(
    "command, expected",
    [
        ("glofnd-train --no_such_flag 1", "no_such_flag"),
        ("glofnd-train recipes/no_such_recipe.yaml", "no_such_recipe"),
        ("glofnd-eval --model m --dataset d --no-such-flag", "unrecognized"),
        ("glofnd-eval --model m", "required"),
        ("python -m glofnd_hf.cli.eval --model m --dataset d --task nonsense", "invalid choice"),
        ("glofnd-push out --repo-id o/n --no-such", "unrecognized"),
        ("glofnd-shards add-index", "required"),
        ("glofnd-nothing --help", "not a console script"),
        ("accelerate launch glofnd-train recipes/demo.yaml", "-m MODULE"),
        (
            "accelerate launch --config_file recipes/accelerate/none.yaml -m glofnd_hf.cli.train "
            "recipes/demo.yaml",
            "none.yaml does not exist",
        ),
        (
            "accelerate launch -m glofnd_hf.cli.train recipes/demo.yaml --detector_typo x",
            "detector_typo",
        ),
        (".venv/bin/python benchmarks/fn_study.py --no-such-option", "unrecognized"),
        ("python benchmarks/no_such_script.py", "does not exist"),
        ("make no-such-target", "no target"),
    ],
)
def test_checker_rejects(command: str, expected: str, tmp_path: Path, in_root: None) -> None:
    problems = _problems(f"```bash\n{command}\n```\n", tmp_path)
    assert problems and expected in " ".join(problems), problems


def test_checker_python_yaml_json_and_markers(tmp_path: Path, in_root: None) -> None:
    def one(lang: str, body: str, marker: str = "") -> list[str]:
        return _problems(f"{marker}\n```{lang}\n{body}\n```\n", tmp_path)

    assert (
        one(
            "python",
            "from glofnd_hf.args import GloFNDTrainingArguments\n"
            "GloFNDTrainingArguments(output_dir='o', detector='glofnd')",
        )
        == []
    )
    assert one("python", "from glofnd_hf.args import NoSuchName")
    assert one("python", "import glofnd_hf.no_such_module")
    assert one(
        "python",
        "from glofnd_hf.args import GloFNDTrainingArguments\n"
        "GloFNDTrainingArguments(output_dir='o', no_such_field=1)",
    )
    assert one("python", "def broken(:")
    assert one("yaml", "detector: glofnd\nper_device_train_batch_size: 8") == []
    assert one("yaml", "detectr: glofnd")
    assert one("json", '{"a": 1,}')
    assert (
        one(
            "bash",
            "glofnd-train --no_such_flag 1",
            "<!-- docs-test: skip: shows a mistake on purpose -->",
        )
        == []
    )
    assert one("bash", "glofnd-train --no_such_flag 1", "<!-- docs-test: skip -->")


def test_shell_parsing() -> None:
    block = Block(
        "x",
        1,
        "bash",
        "# comment\nFOO=1 glofnd-train a.yaml \\\n    --x 1  # tail\nmake demo && make test\n",
        None,
    )
    assert shell_commands(block) == [
        ["glofnd-train", "a.yaml", "--x", "1"],
        ["make", "demo"],
        ["make", "test"],
    ]
    console = Block(
        "x", 1, "console", "$ glofnd-eval --model m \\\n  --dataset d\noutput line\n", None
    )
    assert shell_commands(console) == [["glofnd-eval", "--model", "m", "--dataset", "d"]]


def test_links_checker(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [bad](#nope) [gone](missing.md)\n")
    problems = check_links(page)
    assert len(problems) == 2 and "#nope" in problems[0] and "missing.md" in problems[1]
