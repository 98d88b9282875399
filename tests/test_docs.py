"""The documentation cannot rot: its code runs, its generated pages match the code, its links resolve, and what it
quotes is what the library prints.

Every ```python block of `docs/*.md` and `README.md` runs on its own, as a reader who copies it into a new program runs
it: in a process of its own, with none of the names, imports or registrations of the blocks before it, so each block
carries its own imports and tiny model. A page's blocks run in order in one temporary working directory: a block may
read a file an earlier one wrote (an adapter saved "in a new program"), never a name. A block written right after a line
`<!-- no-test: reason -->` is skipped; that is for Hub and network calls and for fragments only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from peft_toast import architectures

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]
NO_TEST = re.compile(r"^<!--\s*no-test:(.*?)-->\s*$")
FENCE = re.compile(r"^(```+)(\S*)\s*$")


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass
class CodeBlock:
    line: int  # 1-based line of the block's first code line in its file
    language: str
    code: str
    skip_reason: Optional[str]  # from a `<!-- no-test: reason -->` line right before the block


def code_blocks(text: str) -> list[CodeBlock]:
    """The top-level fenced blocks of a Markdown text (a fence of n backticks closes with a line of n or more)."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, start = opening.group(1), index + 1
        end = next((i for i in range(start, len(lines)) if re.fullmatch(f"{fence}`*", lines[i].strip())), None)
        if end is None:
            raise ValueError(f"The {fence} block opened on line {index + 1} is never closed.")
        marker = NO_TEST.match(lines[index - 1]) if index > 0 else None
        reason = marker.group(1).strip() if marker else None
        blocks.append(CodeBlock(start + 1, opening.group(2), "\n".join(lines[start:end]) + "\n", reason))
        index = end + 1
    return blocks


# Runs one block (a JSON job: code, line, path, cwd, log) as the program `__main__` of a new process: its output goes to
# the job's log, an exception makes the exit status 1. `serve MODULE...` is a zygote instead: it imports the slow
# third-party modules once, then forks a process per job read from stdin and answers with its exit status. A forked
# block ends with `os._exit` once its own objects are finalised: tearing down torch and transformers again in every
# process would cost more than the block.
RUNNER = r"""
import gc, json, os, sys, traceback, types

def run(job):
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(job["cwd"])
    sys.argv = [job["path"]]
    main = sys.modules["__main__"] = types.ModuleType("__main__")  # a fresh namespace: nothing of this runner
    # Padding with newlines makes tracebacks point at the line of the Markdown file.
    exec(compile("\n" * (job["line"] - 1) + job["code"], job["path"], "exec"), main.__dict__)

def run_forked(job):
    try:
        run(job)
        status = 0
    except SystemExit as stop:
        status = 0 if stop.code in (None, 0) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.modules["__main__"].__dict__.clear()
    gc.collect()  # the block's objects are finalised (its files closed), as at the end of a program
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

if sys.argv[1] == "serve":
    for module in sys.argv[2:]:
        __import__(module)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            run_forked(json.loads(line))
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
else:
    run(json.loads(sys.argv[1]))
"""
# What the zygote imports before forking: third-party modules only. Never peft_toast, whose import registers TOAST with
# PEFT: a block that forgets `import peft_toast` must fail as it would in a new program.
PRELOAD = ("torch", "transformers", "peft", "datasets", "transformers.trainer")
BLOCK_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def run_block(tmp_path_factory) -> Iterator[Callable[[dict], int]]:
    """Runs a block job in a new process and returns its exit status.

    Each block gets a process of its own, forked from a zygote that imported only `PRELOAD` (a new interpreter spends
    ~8 s on those imports on a 2-core machine; a fork, milliseconds). `PEFT_TOAST_DOCS_FRESH=1` starts a whole new
    interpreter (`sys.executable`) per block instead, as does a system without `os.fork`. One torch thread, as in the
    rest of the suite: the blocks' models are tiny.
    """
    environment = {**os.environ, **BLOCK_ENVIRONMENT}
    if os.environ.get("PEFT_TOAST_DOCS_FRESH") == "1" or not hasattr(os, "fork"):
        yield lambda job: subprocess.run([sys.executable, "-c", RUNNER, json.dumps(job)], env=environment).returncode
        return
    log = tmp_path_factory.mktemp("docs") / "zygote.log"
    with open(log, "w") as errors:
        zygote = subprocess.Popen(
            [sys.executable, "-c", RUNNER, "serve", *PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            env=environment,
            text=True,
            start_new_session=True,  # its own process group: the zygote and the blocks' processes
        )

    def run(job: dict) -> int:
        zygote.stdin.write(json.dumps(job) + "\n")
        zygote.stdin.flush()
        answer = zygote.stdout.readline()
        assert answer, f"The block runner died (exit status {zygote.wait()}):\n{log.read_text()}"
        return int(answer)

    yield run
    zygote.stdin.close()
    try:
        zygote.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a block hung (and its test failed): end its process and the zygote
        os.killpg(zygote.pid, signal.SIGKILL)
    zygote.stdout.close()


# Pages whose blocks load real pretrained models: they run with the slow tests.
SLOW_PAGES = {"docs/assets.md"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(path, marks=pytest.mark.slow) if relative(path) in SLOW_PAGES else path for path in DOC_FILES],
    ids=relative,
)
def test_python_blocks_run_each_on_its_own(path, tmp_path, run_block):
    blocks = [block for block in code_blocks(path.read_text()) if block.language == "python"]
    runnable = [block for block in blocks if block.skip_reason is None]
    if not runnable:
        pytest.skip(f"{relative(path)} has no python block to run")
    workdir = tmp_path / "work"
    workdir.mkdir()
    for index, block in enumerate(runnable):
        log = tmp_path / f"block-{index}.log"
        job = {"code": block.code, "line": block.line, "path": str(path), "cwd": str(workdir), "log": str(log)}
        status = run_block(job)
        assert status == 0, (
            f"The block on line {block.line} of {relative(path)}, run on its own, exited with {status}:\n"
            f"{log.read_text()}"
        )


@pytest.mark.parametrize("path", DOC_FILES, ids=relative)
def test_no_test_markers_say_why_and_sit_on_a_python_block(path):
    lines = path.read_text().splitlines()
    skipped = {block.line - 3 for block in code_blocks(path.read_text()) if block.skip_reason is not None}
    for number, line in enumerate(lines):
        marker = NO_TEST.match(line)
        if marker is None:
            continue
        assert marker.group(1).strip(), f"{relative(path)}:{number + 1}: a no-test marker must give its reason."
        assert number in skipped and lines[number + 1] == "```python", (
            f"{relative(path)}:{number + 1}: a no-test marker must be the line right before a ```python block."
        )


def test_a_block_sees_files_but_no_name_import_or_registration_of_the_blocks_before_it(tmp_path, run_block):
    blocks = [
        "import peft_toast\nshared = 1\nopen('written.txt', 'w').write('a block wrote this')\n",
        "import peft\nassert 'TOAST' not in peft.PeftType.__members__  # registered only by an import of its own\n",
        "assert open('written.txt').read() == 'a block wrote this'\n",
        "\n\nprint(shared)\n",
    ]
    logs = [tmp_path / f"{index}.log" for index in range(len(blocks))]
    jobs = [{"code": code, "line": 3, "path": "page.md", "cwd": str(tmp_path), "log": str(log)}
            for code, log in zip(blocks, logs)]  # fmt: skip
    assert [run_block(job) for job in jobs] == [0, 0, 0, 1]
    assert 'File "page.md", line 5' in logs[3].read_text() and "NameError: name 'shared'" in logs[3].read_text()


def test_extractor_reads_blocks_markers_and_line_numbers():
    text = textwrap.dedent(
        """\
        # Title
        ```python
        a = 1
        ```
        <!-- no-test: needs the Hub -->
        ```python
        b = 2
        ```
        ````text
        ```python
        c = 3
        ```
        ````
        """
    )
    blocks = code_blocks(text)
    assert [(b.line, b.language, b.code, b.skip_reason) for b in blocks] == [
        (3, "python", "a = 1\n", None),
        (7, "python", "b = 2\n", "needs the Hub"),
        (10, "text", "```python\nc = 3\n```\n", None),
    ]


def load_gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["docs/configuration.md", "docs/architectures.md"])
def test_generated_pages_match_the_code(page):
    gen_docs = load_gen_docs()
    assert (ROOT / page).read_text() == gen_docs.GENERATED[page](), (
        f"{page} is out of date; run `python scripts/gen_docs.py` and commit the result."
    )


def test_configuration_page_covers_every_field_with_its_help():
    from peft_toast import ToastConfig

    gen_docs = load_gen_docs()
    page = (ROOT / "docs/configuration.md").read_text()
    fields = gen_docs.toast_fields()
    assert {field.name for field in fields} >= {"feedback_rank", "lite_rank", "channel_selection"}
    for field in fields:
        assert f"| [`{field.name}`](#{field.name}) |" in page
        assert field.metadata["help"].replace("|", "\\|") in page
        assert f"### `{field.name}`" in page
    assert set(gen_docs.docstring_args(ToastConfig)) >= {field.name for field in fields}


def test_architectures_page_lists_every_family_of_the_sweep_and_marks_each_registry_entry():
    from support_matrix import FAMILIES

    page = (ROOT / "docs/architectures.md").read_text()
    matrix, registry = page.split("## The registry")
    tested = {family.model_type for family in FAMILIES if family.refused is None}
    for family in FAMILIES:
        row = next(line for line in matrix.splitlines() if line.startswith(f"| `{family.model_type}` |"))
        assert f"| {'tested' if family.refused is None else 'refused'} |" in row
    for model_type in architectures.ARCHITECTURES:
        status = "tested" if model_type in tested else "untested"
        row = next(line for line in registry.splitlines() if line.startswith(f"| `{model_type}` |"))
        assert row.endswith(f"| {status} |")


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", DOC_FILES, ids=relative)
def test_local_links_resolve(path):
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        assert (path.parent / target).exists(), f"{relative(path)} links to {target}, which does not exist."


def test_index_links_every_page():
    index = (ROOT / "docs/index.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not link {page.name}."


@pytest.mark.slow  # a second process
def test_limitations_quotes_the_error_of_loading_without_the_import(tmp_path):
    """Without `import peft_toast`, PEFT cannot resolve "TOAST": the FAQ quotes the exact error."""
    from conftest import make_vit
    from peft import get_peft_model

    from peft_toast import ToastConfig

    base = make_vit()
    base.save_pretrained(tmp_path / "base")
    get_peft_model(base, ToastConfig()).save_pretrained(tmp_path / "adapter")
    script = (
        "from peft import PeftModel\n"
        "from transformers import ViTForImageClassification\n"
        f"base = ViTForImageClassification.from_pretrained({str(tmp_path / 'base')!r})\n"
        f"PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == "KeyError: 'TOAST'"
    limitations = (ROOT / "docs/limitations.md").read_text()
    assert f"\n{last_line}\n" in limitations
    assert "import peft_toast" in limitations
