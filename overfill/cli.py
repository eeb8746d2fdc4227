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
import errno
import importlib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, get_args, get_origin, get_type_hints

from .errors import ECHO_LIMIT, OverfillError, capped

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
MESSAGE_LIMIT = 1500
"""The longest error line printed: messages cap what they repeat of the input, and this cuts any
message that still grew with it (a long list of problems) to a line a terminal shows."""
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

    def load(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        _refuse_aliases(text)
        return yaml_load(text)

    set_loader(LOADER, load, (YAMLError,))


def _refuse_aliases(text: str) -> None:
    """No YAML alias (`*name`) in a setting: settings need none, and nested ones expand to a value of
    billions of items (the "billion laughs"), which an error message would then repeat."""
    import yaml

    if "*" in text and any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
        raise yaml.YAMLError("YAML aliases (*name) are not allowed in settings")


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
    _usage_with_separator(parser, cls)
    return parser


def _usage_with_separator(parser, cls: type) -> None:
    """The usage line ends `[--] PROMPT` where a list flag could take the positionals after it: the
    form that always works (`_parse` gives back what a list flag took, where it can tell)."""
    hints = get_type_hints(cls)
    fields = dataclasses.fields(cls)
    positionals = [f.metadata.get("metavar", f.name.upper()) for f in fields if f.metadata.get("positional")
                   and _default(f) is dataclasses.MISSING]
    has_lists = any(get_origin(_unwrap_optional(hints[f.name])[0]) in (list, tuple) for f in fields
                    if not f.metadata.get("positional"))
    if positionals and has_lists:
        usage = parser.format_usage().removeprefix("usage: ").rstrip()
        head, _, tail = usage.rpartition(positionals[0])  # a usage line gives the positionals last
        parser.usage = f"{head}[--] {positionals[0]}{tail}".replace("%", "%%")


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
            f", got {capped(repr(got.group(1)))}" if got else "")
    if key:  # --config: a missing or malformed file
        return f"{name(key.group(1))}: {capped(' '.join(text[key.end():].split()), 4 * ECHO_LIMIT)}"
    config = re.match(r"Problems parsing config\s*:?\s*", text)
    if config:
        return f"--config: {capped(' '.join(text[config.end():].split()), 4 * ECHO_LIMIT)}"
    required = re.match(r"the following arguments are required: (.*)", text)
    if required:
        return "missing " + ", ".join(name(k.strip()) for k in required.group(1).split(","))
    return capped(" ".join(text.split()), 4 * ECHO_LIMIT)


def parse_args(cls: type, argv: list[str], prog: str = "overfill", description: str | None = None) -> Any:
    """The dataclass `cls` from command-line flags (and a --config file); exits 2 on a bad flag."""
    from jsonargparse import ArgumentError

    parser = command_parser(cls, prog, description)
    argv = _config_first(list(argv))
    try:
        _check_config_files(argv)
        ns = _parse(parser, cls, argv)
        values = {f.name: _null_list(f.name, ns[f.name], get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)}
    except ArgumentError as e:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {error_message(str(e), cls)}", file=sys.stderr)
        raise SystemExit(2) from None
    return cls(**values)


def _check_config_files(argv: list[str]) -> None:
    """Refuse a --config file that is not UTF-8 text (the parser would end in a traceback)."""
    from jsonargparse import ArgumentError

    from .files import not_utf8

    for i, arg in enumerate(argv):
        name = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.removeprefix("--config=")
        if arg.startswith("--config") and os.path.isfile(name):
            try:
                Path(name).read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise ArgumentError(None, f"--config: {not_utf8(name, e, read='file')}") from None


def _parse(parser, cls: type, argv: list[str]):
    """`parser.parse_args`, giving back a required positional that a list flag before it took
    (`--stop a b PROMPT`: argparse gives `--stop` all three, then misses PROMPT)."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(argv)
    except ArgumentError as e:
        missing = re.match(r"the following arguments are required: (.*)", str(e))
        given_back = _give_back(argv, cls, len(missing.group(1).split(","))) if missing else None
        if given_back is None:
            raise
        return parser.parse_args(given_back)


def _give_back(argv: list[str], cls: type, missing: int) -> list[str] | None:
    """`argv` with the last `missing` values of a list flag moved to the end, after `--`, where exactly
    one list flag took more values than that; else None (which values were meant is then unclear)."""
    hints = get_type_hints(cls)
    lists = {flag(f.name) for f in dataclasses.fields(cls) if not f.metadata.get("positional")
             and get_origin(_unwrap_optional(hints[f.name])[0]) in (list, tuple)}
    if "--" in argv:
        return None
    runs, i = [], 0  # (first, end) of each list flag's values
    while i < len(argv):
        end = i + 1
        if argv[i] in lists:
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            runs.append((i + 1, end))
        i = end
    long_enough = [(first, end) for first, end in runs if end - first > missing]
    if len(long_enough) != 1:
        return None
    cut = long_enough[0][1]
    return argv[:cut - missing] + argv[cut:] + ["--"] + argv[cut - missing:cut]


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
        print(f"overfill {name}: error: {capped(str(e), MESSAGE_LIMIT)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        print(f"overfill {name}: error: a path given is too long for the file system: "
              f"{capped(str(e.filename))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"overfill {name}: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
