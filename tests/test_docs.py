"""The documentation cannot rot: its code runs, its generated pages match the code, its links resolve, and what it
quotes is what the library prints.

Every ```python block of `docs/*.md` and `README.md` runs, each file's blocks in order in one namespace (a later block
may use an earlier one's names), in a temporary working directory. A block written right after a line
`<!-- no-test: reason -->` is skipped; that is for Hub and network calls and for fragments only.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
import sys
import textwrap
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


@pytest.fixture
def restore_architectures():
    """Docs may teach TOAST an architecture (`register_architecture`): keep that out of the other tests."""
    saved = copy.copy(architectures.ARCHITECTURES)
    yield
    architectures.ARCHITECTURES.clear()
    architectures.ARCHITECTURES.update(saved)


# Pages whose blocks load real pretrained models: they run with the slow tests.
SLOW_PAGES = {"docs/assets.md"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(path, marks=pytest.mark.slow) if relative(path) in SLOW_PAGES else path for path in DOC_FILES],
    ids=relative,
)
def test_python_blocks_run(path, tmp_path, monkeypatch, restore_architectures):
    blocks = [block for block in code_blocks(path.read_text()) if block.language == "python"]
    runnable = [block for block in blocks if block.skip_reason is None]
    if not runnable:
        pytest.skip(f"{relative(path)} has no python block to run")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in runnable:
        # Padding with newlines makes tracebacks point at the line of the Markdown file.
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
        exec(code, namespace)


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


def test_architectures_page_marks_each_registry_entry():
    page = (ROOT / "docs/architectures.md").read_text()
    for model_type in architectures.ARCHITECTURES:
        status = "tested" if model_type in architectures.TESTED_MODEL_TYPES else "untested"
        row = next(line for line in page.splitlines() if line.startswith(f"| `{model_type}` |"))
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
