import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from overfill.cli import COMMANDS, _args_class, _load, add_dataclass_arguments, main


@dataclass
class DemoArgs:
    model: str = field(metadata={"help": "model", "positional": True})
    out: str = field(default="x", metadata={"help": "output"})
    ratio: float | None = field(default=None, metadata={"help": "ratio"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "mode"})
    tasks: list[str] = field(default_factory=list, metadata={"help": "tasks"})
    stream: bool = field(default=False, metadata={"help": "stream"})


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, DemoArgs)
    return DemoArgs(**vars(parser.parse_args(argv)))


def test_dataclass_fields_become_typed_flags():
    args = parse(["m", "--ratio", "0.5", "--mode", "b", "--tasks", "x", "y", "--stream"])
    assert args == DemoArgs("m", "x", 0.5, "b", ["x", "y"], True)
    assert parse(["m"]) == DemoArgs("m")
    with pytest.raises(SystemExit):
        parse(["m", "--mode", "c"])


def test_every_command_has_a_dataclass_signature():
    for name, (target, _) in COMMANDS.items():
        try:
            fn = _load(target)
        except ModuleNotFoundError:
            pytest.fail(f"command {name}: module of {target} is missing")
        cls = _args_class(fn)
        add_dataclass_arguments(argparse.ArgumentParser(), cls)


def test_user_errors_are_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "overfill.cli", "info", "/no/such/model"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_no_command_prints_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 0
    assert "prune" in capsys.readouterr().out
