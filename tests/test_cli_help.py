"""The command line explains itself: --version, help on every argument, defaults, examples."""
from __future__ import annotations

import argparse

import pytest

from effvision import __version__
from effvision.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"effvision {__version__}"


@pytest.mark.parametrize("command", ["run", "eval", "export", "bench", "models", "push", "prune", "quantize"])
def test_every_command_has_examples_and_every_argument_a_help(command: str) -> None:
    sub = _subparsers(build_parser())[command]
    text = sub.format_help()
    assert "examples:" in text and f"effvision {command}" in text
    for action in sub._actions:
        assert action.help, f"{command} {action.dest} has no help text"
    if command == "bench":
        assert "(default: 32)" in text  # defaults are shown
    if command == "export":
        assert "onnx:" in text and "tensorrt:" in text  # --format lists what each format gives
