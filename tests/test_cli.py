import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from overfill.cli import COMMANDS, _args_class, _load, command_parser, main, parse_args


@dataclass
class DemoArgs:
    model: str = field(metadata={"help": "model", "positional": True})
    out: str = field(default="x", metadata={"help": "output"})
    ratio: float | None = field(default=None, metadata={"help": "ratio"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "mode"})
    tasks: list[str] = field(default_factory=list, metadata={"help": "tasks"})
    stream: bool = field(default=False, metadata={"help": "stream"})
    limit: int | None = field(default=50, metadata={"help": "limit"})
    sizes: list[int] | None = field(default=None, metadata={"help": "sizes"})
    weight: float = field(default=1.0, metadata={"help": "weight"})


def parse(argv):
    return parse_args(DemoArgs, argv, prog="overfill demo")


def test_dataclass_fields_become_typed_flags():
    args = parse(["m", "--ratio", "0.5", "--mode", "b", "--tasks", "x", "y", "--stream"])
    assert args == DemoArgs("m", "x", 0.5, "b", ["x", "y"], True)
    assert parse(["m"]) == DemoArgs("m")
    assert parse(["m", "--stream", "--no-stream"]).stream is False
    assert parse(["m", "--weight", "3"]).weight == 3.0
    assert math.isnan(parse(["m", "--weight", "nan"]).weight)  # for the command to refuse, with its reason
    with pytest.raises(SystemExit):
        parse(["m", "--mode", "c"])


def test_null_and_none_give_none_for_an_optional_field():
    assert parse(["m", "--limit", "null"]).limit is None
    assert parse(["m", "--limit", "none"]).limit is None
    assert parse(["m", "--limit", "7"]).limit == 7
    assert parse(["m", "--tasks", "none"]).tasks == ["none"]  # a string stays a string
    assert parse(["m", "--sizes", "null"]).sizes is None


def test_a_list_flag_takes_several_values():
    assert parse(["m", "--sizes", "1", "2", "3"]).sizes == [1, 2, 3]
    from overfill.train import TrainConfig

    argv = ["--full", "f", "--decoder", "d", "--data", "x.jsonl", "--out", "o", "--snapshots", "100", "200"]
    assert parse_args(TrainConfig, argv).snapshots == [100, 200]


@pytest.mark.parametrize("argv,words", [
    (["m", "--mode", "c"], ["--mode", "one of a, b", "'c'"]),
    (["m", "--limit", "seven"], ["--limit", "integer or null", "'seven'"]),
    (["m", "--sizes", "1", "x"], ["--sizes", "list of integers"]),
    (["m", "--sizes", "1", "null"], ["--sizes", "null must stand alone"]),
    (["m", "--ratio", "fast"], ["--ratio", "number"]),
    (["m", "--weight", "fast"], ["--weight", "float", "'fast'"]),
    (["m", "--bogus", "1"], ["--bogus"]),
    ([], ["MODEL"]),
    (["m", "--config", "/no/such.yaml"], ["--config", "/no/such.yaml"]),
])
def test_a_bad_value_exits_2_with_one_line_naming_the_flag(capsys, argv, words):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("overfill demo: error: ")]
    assert len(lines) == 1
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_sets_values_and_flags_override_it(tmp_path, suffix):
    values = {"model": "from-file", "mode": "b", "limit": None, "tasks": ["p", "q"], "ratio": 0.25}
    config = tmp_path / f"settings{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps(values))
    else:
        config.write_text("model: from-file\nmode: b\nlimit: null\ntasks: [p, q]\nratio: 0.25\n")
    assert parse(["--config", str(config)]) == DemoArgs("from-file", mode="b", limit=None, tasks=["p", "q"],
                                                        ratio=0.25)
    overridden = DemoArgs("m", mode="a", limit=3, tasks=["p", "q"], ratio=0.25)
    assert parse(["m", "--config", str(config), "--mode", "a", "--limit", "3"]) == overridden
    assert parse(["--mode", "a", "--limit", "3", "m", "--config", str(config)]) == overridden  # wherever it stands


def test_a_saved_train_config_is_a_config_file(tmp_path):
    from overfill.train import TrainConfig

    saved = TrainConfig(full="f", decoder="d", data="x.jsonl", out="run", tokens=5000, snapshots=[100, 200],
                        precision="fp32")
    (tmp_path / "train_config.json").write_text(saved.to_json())
    again = parse_args(TrainConfig, ["--config", str(tmp_path / "train_config.json"), "--out", "run2"])
    assert again == dataclasses.replace(saved, out="run2")


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("modle: x\n")
    with pytest.raises(SystemExit):
        parse(["m", "--config", str(tmp_path / "c.yaml")])
    assert "modle" in capsys.readouterr().err


def test_build_tokens_null_reaches_the_build_as_none(monkeypatch):
    from overfill.commands import build as command

    seen = []
    monkeypatch.setattr(command, "build", lambda cfg: seen.append(cfg) or "report.md")
    assert main(["build", "--tokens", "null", "--steps", "5", "--limit", "none"]) == 0
    assert (seen[0].tokens, seen[0].steps, seen[0].limit) == (None, 5, None)
    assert main(["build", "--tokens", "600"]) == 0
    assert (seen[1].tokens, seen[1].steps) == (600, None)


def test_every_command_has_a_dataclass_signature():
    for name, (target, _) in COMMANDS.items():
        try:
            fn = _load(target)
        except ModuleNotFoundError:
            pytest.fail(f"command {name}: module of {target} is missing")
        cls = _args_class(fn)
        assert dataclasses.is_dataclass(cls)
        command_parser(cls, f"overfill {name}").format_help()


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


def test_help_imports_neither_torch_nor_the_parser():
    code = ("import sys\nfrom overfill.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'jsonargparse' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stderr.strip() == "False False"


@pytest.mark.parametrize("argv,expected", [
    (["--tasks", "x", "y", "m"], DemoArgs("m", tasks=["x", "y"])),
    (["--tasks", "x", "m", "--stream"], DemoArgs("m", tasks=["x"], stream=True)),
    (["--limit", "3", "--tasks", "x", "m"], DemoArgs("m", tasks=["x"], limit=3)),
    (["--tasks", "x", "y", "--", "m"], DemoArgs("m", tasks=["x", "y"])),
])
def test_a_list_flag_before_the_positional_does_not_swallow_it(argv, expected):
    assert parse(argv) == expected


def test_two_list_flags_before_the_positional_are_not_guessed_at(capsys):
    with pytest.raises(SystemExit):
        parse(["--tasks", "x", "y", "--sizes", "1", "2"])  # the positional could be y or 2: none is taken
    assert "missing MODEL" in capsys.readouterr().err


def test_the_usage_line_shows_the_form_that_always_works():
    from overfill.commands.generate import GenerateArgs

    usage = " ".join(command_parser(GenerateArgs, "overfill generate").format_usage().split())
    assert usage.endswith("[--stop STOP [STOP ...]] [--stream] [--refresh-every REFRESH_EVERY] [--device DEVICE] "
                          "[--precision {auto,fp32,bf16}] [--] PROMPT")


def test_an_error_repeats_at_most_the_echo_limit_of_a_value(capsys):
    from overfill.errors import ECHO_LIMIT

    value = "x" * 100_000
    with pytest.raises(SystemExit):
        parse(["m", "--limit", value])
    line = [line for line in capsys.readouterr().err.splitlines() if line.startswith("overfill demo: error:")][0]
    left_out = len(repr(value)) - ECHO_LIMIT
    assert len(line) < 2 * ECHO_LIMIT and line.endswith(f"... ({left_out:,} more characters)")


def test_yaml_aliases_are_refused_in_a_config_and_stay_text_in_a_flag(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("tasks: &t [p, q]\nmodel: *t\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "c.yaml")])
    assert "--config: YAML aliases" in capsys.readouterr().err
    assert parse(["*bold*", "--tasks", "&a", "*a"]) == DemoArgs("*bold*", tasks=["&a", "*a"])
