"""The `overfill` command: each sub-command is a typed function taking one dataclass.

A command lives in the commands layer (`overfill/commands/`, one module per command) as

    @dataclass(kw_only=True)
    class PruneArgs(PruneConfig):
        model: str = field(metadata={"help": "model to prune", "positional": True})
        out: str = field(default="pruned", metadata={"help": "output directory"})

    def prune_command(args: PruneArgs) -> None: ...

and is listed in COMMANDS below as "module:function". Modules are imported only when their
command runs, so `overfill --help` stays fast and heavy imports stay local.

The flags come from the dataclass's fields through jsonargparse. It was chosen over
transformers' `HfArgumentParser` because it checks the type hints themselves (`int | None`,
`Literal[...]`, lists, numbers), gives None as `null`, and reads a config file under the command
line: `--config FILE.yaml|json` (keys are the field names, so a saved train_config.json is one),
with the flags given overriding it; `--print_config` writes one. `HfArgumentParser` has no
positionals, turns `int | None` into a plain int (no way to say None: the `overfill build
--tokens` crash) and reads a config file instead of the command line, not under it. The glue
here is what the project chose on top: `--max-len` / `--no-stream` spellings, help and
positionals from field metadata, `none` as a second spelling of null, lists as `--x 1 2 3`,
and one-line errors that name the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import types
import typing
from typing import Any, Callable, Literal, Optional, get_args, get_origin, get_type_hints

from .errors import OverfillError

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("overfill.commands.generate:generate_command", "two-stage generation from a prompt or chat message"),
    "info": ("overfill.commands.info:info_command", "sizes of a model; cache compatibility of a pair"),
    "prune": ("overfill.commands.prune:prune_command", "Minitron-style width pruning that keeps the KV cache"),
    "teach": ("overfill.commands.teach:teach_command", "the full model answers the training prompts (distillation data)"),
    "train": ("overfill.commands.train:train_command", "train an OverFill decoder or the pruned baseline"),
    "eval": ("overfill.commands.eval:eval_command", "benchmarks and chat quality: full / decoder / overfill"),
    "bench": ("overfill.commands.bench:bench_command", "latency and throughput against the memory-bandwidth floor"),
    "serve": ("overfill.commands.serve:serve_command", "OpenAI-compatible HTTP server"),
    "export": ("overfill.commands.export:export_command", "an OverFill pair as a directory that vLLM serves"),
    "build": ("overfill.commands.build:build_command", "the whole pipeline: prune, train, eval, bench, report"),
}
LOADER = "overfill"
"""jsonargparse's YAML value loader, with `none` read as null (as the flags always took it)."""


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _args_class(fn: Callable) -> type:
    params = list(inspect.signature(fn).parameters.values())
    return get_type_hints(fn)[params[0].name]


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the hint without None, whether None was allowed)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argument(f: dataclasses.Field, hint: Any) -> dict:
    """add_argument's keywords for one field (its name aside)."""
    kwargs: dict[str, Any] = {"help": f.metadata.get("help", "")}
    inner, optional = _unwrap_optional(hint)
    if inner is bool:
        from jsonargparse import ActionYesNo

        kwargs["action"] = ActionYesNo(no_prefix="no-")
    elif get_origin(inner) in (list, tuple):  # `--x 1 2 3`: each value is checked as the item type
        item = get_args(inner)[0]
        kwargs.update(type=Optional[item] if optional else item, nargs="*" if f.metadata.get("positional") else "+")
    else:
        kwargs["type"] = _float if hint is float else hint
    default = _default(f)
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
        if f.metadata.get("positional") and "nargs" not in kwargs:
            kwargs["nargs"] = "?"
    elif not f.metadata.get("positional"):
        kwargs["required"] = True
    return kwargs


class _Float:
    """A float flag as Python reads one: jsonargparse's own float refuses `nan`, which the commands
    refuse themselves, with a reason."""

    __name__ = "float"  # argparse's error: "invalid float value"

    def __call__(self, text: Any) -> float:
        return float(text)

    def __repr__(self) -> str:  # the help's "type: float"
        return "float"


_float = _Float()


def _value_loader() -> None:
    from jsonargparse import get_loader, set_loader
    from yaml import YAMLError

    yaml_load = get_loader("yaml")
    set_loader(LOADER, lambda text: None if text.strip().lower() == "none" else yaml_load(text), (YAMLError,))


def command_parser(cls: type, prog: str = "overfill", description: str | None = None):
    """A jsonargparse parser with one argument per field of the dataclass `cls`, and `--config`."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    _value_loader()
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, parser_mode=LOADER)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML or JSON file of settings (keys: the flags' names with underscores); "
                             "flags given override it")
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kwargs = _argument(f, hints[f.name])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, metavar=f.metadata.get("metavar", f.name.upper()), **kwargs)
        else:
            parser.add_argument(flag(f.name), dest=f.name, **kwargs)
    return parser


def _config_first(argv: list[str]) -> list[str]:
    """`--config FILE` moved to the front, wherever it was given, so that every flag overrides it."""
    first, rest, i = [], [], 0
    while i < len(argv) and argv[i] != "--":
        n = 2 if argv[i] == "--config" else 1
        (first if argv[i] == "--config" or argv[i].startswith("--config=") else rest).extend(argv[i:i + n])
        i += n
    return first + rest + argv[i:]


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, for an error message."""
    inner, optional = _unwrap_optional(hint)
    if get_origin(inner) is Literal:
        text = "one of " + ", ".join(map(str, get_args(inner)))
    elif get_origin(inner) in (list, tuple):
        text = f"a list of {describe(get_args(inner)[0]).removeprefix('a ').removeprefix('an ')}s"
    else:
        text = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(inner, str(inner))
    return text + (" or null" if optional else "")


def error_message(text: str, cls: type) -> str:
    """jsonargparse's (multi-line) error as one line that names the flag."""
    hints = get_type_hints(cls)
    positional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")}

    def name(key: str) -> str:
        return key.upper() if key in positional else flag(key)

    key = re.match(r'Parser key "(\w+)"(?: element \d+)?:\s*', text)
    if key and key.group(1) in hints:
        got = re.search(r"(?:Given|Got) value: (.*)$", text, re.M)
        return f"{name(key.group(1))}: expected {describe(hints[key.group(1)])}" + (
            f", got {got.group(1)!r}" if got else "")
    if key:  # --config: a missing or malformed file
        return f"{name(key.group(1))}: {' '.join(text[key.end():].split())}"
    required = re.match(r"the following arguments are required: (.*)", text)
    if required:
        return "missing " + ", ".join(name(k.strip()) for k in required.group(1).split(","))
    return " ".join(text.split())


def parse_args(cls: type, argv: list[str], prog: str = "overfill", description: str | None = None) -> Any:
    """The dataclass `cls` from command-line flags (and a --config file); exits 2 on a bad flag."""
    from jsonargparse import ArgumentError

    parser = command_parser(cls, prog, description)
    try:
        ns = parser.parse_args(_config_first(list(argv)))
        values = {f.name: _null_list(f.name, ns[f.name], get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)}
    except ArgumentError as e:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {error_message(str(e), cls)}", file=sys.stderr)
        raise SystemExit(2) from None
    return cls(**values)


def _null_list(name: str, value: Any, hint: Any) -> Any:
    """An optional list's `--x null` arrives as [None] (each value is checked alone): None."""
    from jsonargparse import ArgumentError

    if not (_unwrap_optional(hint)[1] and isinstance(value, list) and None in value):
        return value
    if value != [None]:
        raise ArgumentError(None, f"{flag(name)}: null must stand alone, got {value}")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overfill", description="OverFill: full-model prefill, pruned-model decode.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (target, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    fn = _load(COMMANDS[name][0])
    try:
        result = fn(parse_args(_args_class(fn), rest, prog=f"overfill {name}", description=COMMANDS[name][1]))
    except OverfillError as e:
        print(f"overfill {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"overfill {name}: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
