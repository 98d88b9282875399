"""How the benchmarks report: the raw results as JSON, markdown tables, the sections of `docs/benchmarks.md` (or
another page) that a full run regenerates, matplotlib figures saved under `docs/img/`, and parameter counts as text."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import common  # noqa: I001  (first: it sets the OpenMP wait policy before torch loads)

from peft_toast.io import atomic_file

DOCS = common.REPO / "docs" / "benchmarks.md"
IMAGES = common.REPO / "docs" / "img"


def write_json(path: Path, results: dict[str, Any]) -> None:
    with atomic_file(path) as file:
        json.dump(results, file, indent=2)
        file.write("\n")
    print(f"raw results: {path}")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def update_docs_section(name: str, markdown: str, path: Path = DOCS) -> None:
    """Replace the text between `<!-- BEGIN name -->` and `<!-- END name -->` in `docs/benchmarks.md`."""
    text = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no `{begin}` ... `{end}` section; add the two markers where the table goes.")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with atomic_file(path) as file:
        file.write(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
    print(f"updated section {name!r} of {path}")


def figure_per_task(count: int, width: float, height: float):
    """`(pyplot, figure, axes)`: a matplotlib figure (Agg backend, no display needed) with one row of `count` axes, each
    `width` x `height` inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return plt, figure, axes[0]


def save_figure(figure, name: str) -> Path:
    path = IMAGES / name
    with atomic_file(path, "wb") as file:
        figure.savefig(file, format="png", dpi=120, bbox_inches="tight")
    print(f"plot: {path}")
    return path


def format_count(count: int) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}k"
    return str(count)
