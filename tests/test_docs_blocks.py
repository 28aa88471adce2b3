"""Issue 11, item 23: every Python block of ``docs/*.rst`` and ``README.md`` runs as pasted.

Each file's blocks run in order in one fresh namespace and process (no conftest names; the
torch, NumPy and ``random`` generators randomly seeded, so a page must seed what its outputs
need), with a temporary working directory for the files they write. ``>>>`` blocks must print
what they show (doctest, whitespace normalised, no number tolerance); other Python blocks must
run without error. Shell blocks (``bash``, ``console``, ...) are not run. The processes are
forked from one interpreter that imported torch and curvops and used ``torch.func`` once:
that start-up costs seconds per process, and a page still has to import every name it uses.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [*sorted((ROOT / "docs").glob("*.rst")), ROOT / "README.md"]
PYTHON_LANGUAGES = {"python", "py", "python3", "pycon", "ipython"}
CODE_DIRECTIVE = re.compile(r"^\.\.\s+(code-block|code|sourcecode)::\s*(\S*)\s*$")
FENCE = re.compile(r"^```\s*(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    """A Python block: its first line in the file (1-based), ``"doctest"`` or ``"code"``, its text."""

    line: int
    kind: str
    source: str


def _python_block(line: int, source: str, language: str | None) -> Block | None:
    """The block if it is Python: ``>>>`` examples, a Python language, or (no language) valid Python."""
    if source.lstrip().startswith(">>>"):
        return Block(line, "doctest", source)
    if language is not None and language.lower() not in PYTHON_LANGUAGES:
        return None
    try:
        ast.parse(source)
    except SyntaxError:
        if language is None:
            return None  # an unmarked literal block that is not Python (output, shell, ...)
        raise
    return Block(line, "code", source)


def _indented_body(lines: list[str], start: int) -> tuple[int, int]:
    """``(first, end)``: the indented body after the line ``start - 1``, directive options skipped."""
    i = start
    while i < len(lines) and (not lines[i].strip() or re.match(r"^\s+:\w[\w-]*:", lines[i])):
        i += 1
    first, end = i, i
    while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
        if lines[i].strip():
            end = i + 1
        i += 1
    return first, end


def rst_blocks(text: str) -> list[Block]:
    """The Python blocks of reStructuredText: ``>>>`` paragraphs, ``code-block`` directives and
    ``::`` literal blocks."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        directive = CODE_DIRECTIVE.match(line.strip())
        literal = line.rstrip().endswith("::") and not line.lstrip().startswith("..")
        if line.lstrip().startswith(">>>"):
            end = i
            while end < len(lines) and lines[end].strip():
                end += 1
            blocks.append(Block(i + 1, "doctest", textwrap.dedent("\n".join(lines[i:end])) + "\n"))
            i = end
        elif directive or literal:
            first, end = _indented_body(lines, i + 1)
            if first < end and lines[first][:1].isspace():
                source = textwrap.dedent("\n".join(lines[first:end])) + "\n"
                language = (directive.group(2) or None) if directive else None
                block = _python_block(first + 1, source, language)
                blocks += [block] if block else []
                i = end
            else:
                i += 1
        else:
            i += 1
    return blocks


def markdown_blocks(text: str) -> list[Block]:
    """The Python blocks of Markdown: fenced blocks marked ``python`` (or ``py``, ``pycon``)."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i].strip())
        if not fence:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        if fence.group(1):  # an opening fence with a language
            source = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
            block = _python_block(i + 2, source, fence.group(1))
            blocks += [block] if block else []
        i = end + 1
    return blocks


def file_blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    return markdown_blocks(text) if path.suffix == ".md" else rst_blocks(text)


RUNNER = r"""
import doctest, json, os, random, sys, traceback

import numpy
import torch

import curvops


def warm_up():  # torch.func's first use imports for seconds: once here, not once per page
    model = torch.nn.Linear(2, 2)
    data = [(torch.randn(3, 2), torch.tensor([0, 1, 0]))]
    _ = curvops.GGN(model, torch.nn.CrossEntropyLoss(), data) @ torch.randn(6)
    _ = curvops.KFAC(model, torch.nn.CrossEntropyLoss(), data)


def run_blocks(name, blocks):  # one file's blocks in order in one namespace; the exit status
    names = {"__name__": "__main__"}
    parser = doctest.DocTestParser()
    for block in blocks:
        where = f"{name}:{block['line']}"
        if block["kind"] == "doctest":
            test = parser.get_doctest(block["source"], {}, where, name, block["line"] - 1)
            test.globs = names  # get_doctest copies the names; the blocks of a file share them
            runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.FAIL_FAST)
            runner.run(test, clear_globs=False)
            failed = runner.failures > 0
        else:
            try:
                exec(compile(block["source"], where, "exec"), names)
                failed = False
            except BaseException:
                traceback.print_exc()
                failed = True
        if failed:
            print(f"BLOCK FAILED: {where}")
            return 1
    return 0


def run_file(name, blocks, workdir, output):  # a fresh process, unseeded, in its own directory
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    with open(output, "w") as stream:
        os.dup2(stream.fileno(), 1)
        os.dup2(stream.fileno(), 2)
        sys.stdout = sys.stderr = os.fdopen(1, "w", buffering=1)
        os.chdir(workdir)
        torch.seed(), numpy.random.seed(), random.seed()  # a page must set the seeds its outputs need
        code = 1
        try:
            code = run_blocks(name, blocks)
        finally:
            sys.stdout.flush()
            os._exit(code)


warm_up()
pages = json.load(open(sys.argv[1], encoding="utf-8"))
results = {}
for index, (name, blocks) in enumerate(pages.items()):
    workdir, output = os.path.abspath(f"page{index}"), os.path.abspath(f"page{index}.log")
    os.mkdir(workdir)
    status = run_file(name, blocks, workdir, output)
    results[name] = {"status": status, "output": output}
json.dump(results, open("results.json", "w"))
"""


@pytest.fixture(scope="module")
def page_results(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """``{file: (exit status, output)}`` for every page with Python blocks, each run in a fresh
    process forked from one interpreter that imported torch (the import is most of the cost)."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    tmp = tmp_path_factory.mktemp("doc_blocks")
    pages = {str(p.relative_to(ROOT)): [asdict(b) for b in file_blocks(p)] for p in DOC_FILES}
    (tmp / "pages.json").write_text(json.dumps({k: v for k, v in pages.items() if v}), encoding="utf-8")
    (tmp / "runner.py").write_text(RUNNER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, str(tmp / "runner.py"), str(tmp / "pages.json")],
        cwd=tmp,
        env=env,
        check=True,
        timeout=300,
    )
    results = json.loads((tmp / "results.json").read_text(encoding="utf-8"))
    return {name: (r["status"], Path(r["output"]).read_text(encoding="utf-8")) for name, r in results.items()}


@pytest.mark.parametrize("name", [str(p.relative_to(ROOT)) for p in DOC_FILES if file_blocks(p)])
def test_python_blocks_run_as_pasted(name: str, page_results):
    status, output = page_results[name]
    if status != 0:
        failed = re.findall(r"BLOCK FAILED: (\S+)", output)
        where = failed[0] if failed else name
        pytest.fail(f"the Python block at {where} fails in a fresh interpreter:\n{output}")


SAMPLE_RST = """\
Title
=====

Some text::

    x = 1 + 1

Output, not Python::

    0.5 +/- 0.1 (mean)

.. code-block:: bash

   pip install curvops

.. code-block:: python
   :caption: a caption

   y = x * 2

>>> z = y + 1
>>> z
5
"""


def test_rst_blocks_finds_python_and_skips_the_rest():
    blocks = rst_blocks(SAMPLE_RST)
    assert [(b.line, b.kind, b.source) for b in blocks] == [
        (6, "code", "x = 1 + 1\n"),
        (19, "code", "y = x * 2\n"),
        (21, "doctest", ">>> z = y + 1\n>>> z\n5\n"),
    ]


def test_markdown_blocks_finds_python_fences_only():
    text = "# T\n\n```bash\npip install x\n```\n\n```python\nimport math\nmath.pi\n```\n\n```\nplain\n```\n"
    assert markdown_blocks(text) == [Block(8, "code", "import math\nmath.pi\n")]


def test_every_page_with_examples_is_found():
    found = {p.name for p in DOC_FILES if file_blocks(p)}
    assert {"getting_started.rst", "index.rst", "howto_influence.rst", "README.md"} <= found
