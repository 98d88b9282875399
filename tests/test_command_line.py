"""One flag style for every command: the CLIs (`python -m peft_toast.calibrate`, `.pretune`), examples/ and benchmarks/
declare and show their long options with hyphens (`--train-size`) and still accept the underscore spelling
(`--train_size`) of older commands. Only the parsers are built: nothing runs."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import pytest

from peft_toast.cli import HyphenArgumentParser

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

UNDERSCORE_OPTION = re.compile(r"--[a-z0-9]+_[a-z0-9_]*")
PARSE_ARGS = argparse.ArgumentParser.parse_args


def test_underscore_spelling_is_a_hidden_alias():
    parser = HyphenArgumentParser(prog="p")
    parser.add_argument("--train-size", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--text", default=None)
    assert vars(parser.parse_args(["--train_size", "5", "--no_cache"])) == {
        "train_size": 5,
        "no_cache": True,
        "text": None,
    }
    assert parser.parse_args(["--train_size=6"]).train_size == 6
    assert parser.parse_args(["--train_s", "7"]).train_size == 7  # an abbreviation, as argparse allows
    _, rest = parser.parse_known_args(["--other_option", "--", "--train_size"])
    assert rest == ["--other_option", "--", "--train_size"]  # not an option of the parser; after `--`, a value
    assert not UNDERSCORE_OPTION.search(parser.format_help())
    with pytest.raises(ValueError, match="--train-steps"):
        parser.add_argument("--train_steps")


# Every command, the function that builds its parser, and one multiword option with a value it accepts (None: a switch;
# prompt_init.py has no multiword option).
COMMANDS = {
    "peft_toast.calibrate": ("main", "--num-samples", "7"),
    "peft_toast.pretune": ("main", "--max-steps", "2"),
    "examples/demo.py": ("parse_args", "--train-size", "7"),
    "examples/generate.py": ("parse_args", "--max-new-tokens", "5"),
    "examples/train_accelerate.py": ("parse_args", "--per-device-batch-size", "3"),
    "examples/train_causal_lm.py": ("parse_args", "--max-length", "9"),
    "examples/train_image_classifier.py": ("parse_args", "--train-size", "7"),
    "examples/visualize_attention.py": ("parse_args", "--num-figure", "2"),
    "benchmarks/calibration_speed.py": ("main", "--text-model", "m"),
    "benchmarks/checkpointing_memory.py": ("parse_args", "--seq-len", "5"),
    "benchmarks/cost.py": ("parse_args", "--no-memory", None),
    "benchmarks/feature_cache.py": ("parse_args", "--train-size", "64"),
    "benchmarks/generation.py": ("parse_args", "--new-tokens", "5"),
    "benchmarks/initialisation.py": ("main", "--vision-model", "m"),
    "benchmarks/prompt_init.py": ("main", None, None),
    "benchmarks/quality.py": ("parse_args", "--no-docs", None),
    "benchmarks/transfer.py": ("parse_args", "--source-steps", "5"),
    "benchmarks/scaling.py": ("parse_args", "--no-memory", None),
}


class _Built(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def built_parser(command: str, function: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser that `command`'s `function` builds, caught when it starts parsing."""
    module = importlib.import_module(command if command.startswith("peft_toast.") else Path(command).stem)

    def catch(parser, args=None, namespace=None):
        raise _Built(parser)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(_Built) as built:
            getattr(module, function)([])
    return built.value.parser


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_shows_hyphens_and_accepts_underscores(command, monkeypatch):
    function, option, value = COMMANDS[command]
    parser = built_parser(command, function, monkeypatch)
    assert isinstance(parser, HyphenArgumentParser)
    options = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    assert [flag for flag in options if "_" in flag] == []
    # The description (a script's docstring) may quote other programs' commands: `accelerate launch --mixed_precision`.
    shown = set(UNDERSCORE_OPTION.findall(parser.format_help().replace(parser.description, "")))
    assert not shown & {flag.replace("-", "_").replace("__", "--", 1) for flag in options}
    if option is None:
        return

    required = [word for action in parser._actions if action.required for word in (action.option_strings[0], "x")]
    given = [] if value is None else [value]
    hyphens = PARSE_ARGS(parser, [*required, option, *given])
    underscores = PARSE_ARGS(parser, [*required, option.replace("-", "_").replace("__", "--", 1), *given])
    dest = option[2:].replace("-", "_")
    assert option in options and hyphens == underscores and getattr(hyphens, dest) != parser.get_default(dest)
