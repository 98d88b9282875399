"""The package's modules stay split by job: `import peft_toast` loads the library only (not the command lines
`peft_toast.calibrate` / `peft_toast.pretune`, their helpers `peft_toast.cli`, nor the offline demo assets), so
`python -m peft_toast.calibrate` runs its module once; only `peft_toast.cli` imports `peft_toast.assets`; and the
names that used to live in the command-line modules still import from there."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import peft_toast
from peft_toast import calibrate, calibration, cli, loading, pretune, pretuning

PACKAGE = Path(peft_toast.__file__).resolve().parent
COMMAND_LINE_MODULES = ("peft_toast.calibrate", "peft_toast.pretune", "peft_toast.cli", "peft_toast.assets")


def test_importing_the_package_loads_no_command_line_module():
    script = (
        "import sys, peft_toast\n"
        f"print([name for name in {COMMAND_LINE_MODULES!r} if name in sys.modules])\n"
        "print(peft_toast.calibrate_feedback.__module__, peft_toast.load_initialisation.__module__, "
        "peft_toast.pretune_top_down.__module__)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "peft_toast.calibration peft_toast.loading peft_toast.pretuning"]


@pytest.mark.parametrize("command", ["calibrate", "pretune"])
def test_command_line_runs_without_finding_its_module_imported(command):
    """runpy warns (RuntimeWarning '... found in sys.modules ...') when the package already imported the module that
    `-m` runs; `-W error::RuntimeWarning` turns that into a failure."""
    result = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", f"peft_toast.{command}", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    assert result.stdout.startswith(f"usage: python -m peft_toast.{command}")


def _imports_assets(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = {alias.name for alias in node.names}
            if node.module in ("assets", "peft_toast.assets") or (
                node.module in (None, "peft_toast") and "assets" in names
            ):
                return True
        elif isinstance(node, ast.Import) and any(alias.name == "peft_toast.assets" for alias in node.names):
            return True
    return False


def test_only_the_command_line_helpers_import_the_offline_assets():
    assert sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "assets.py" and _imports_assets(p)) == ["cli.py"]


def test_old_import_paths_still_work():
    """`calibrate.py` and `pretune.py` re-export the names that lived there before the split, as the same objects."""
    homes = {
        calibrate: (calibration, cli, loading),
        pretune: (pretuning, cli),
    }
    for old, new_modules in homes.items():
        assert "main" in old.__all__
        for name in old.__all__:
            if name == "main":
                continue
            home = next(module for module in new_modules if hasattr(module, name))
            assert getattr(old, name) is getattr(home, name), (old.__name__, name)
    assert {"calibrate_feedback", "load_initialisation", "reconstruction_error", "BlockStatistics"} <= set(
        calibrate.__all__
    )
    assert {"pretune_top_down", "PretuneResult", "labelled_examples"} <= set(pretune.__all__)
