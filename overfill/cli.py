"""The `overfill` command: each sub-command is a typed function taking one dataclass.

A command is declared in its pipeline module as

    @dataclass
    class PruneArgs:
        model: str = field(metadata={"help": "model to prune", "positional": True})
        out: str = field(default="pruned", metadata={"help": "output directory"})

    def prune_command(args: PruneArgs) -> None: ...

and listed in COMMANDS below as "module:function". Modules are imported only when
their command runs, so `overfill --help` stays fast and heavy imports stay local.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

from .errors import OverfillError

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("overfill.generate:generate_command", "two-stage generation from a prompt or chat message"),
    "info": ("overfill.two_stage:info_command", "sizes of a model; cache compatibility of a pair"),
    "prune": ("overfill.prune:prune_command", "Minitron-style width pruning that keeps the KV cache"),
    "train": ("overfill.train:train_command", "train an OverFill decoder or the pruned baseline"),
    "eval": ("overfill.evaluate:eval_command", "benchmarks and chat quality: full / decoder / overfill"),
    "bench": ("overfill.bench:bench_command", "latency and throughput against the memory-bandwidth floor"),
    "serve": ("overfill.serve:serve_command", "OpenAI-compatible HTTP server"),
    "export": ("overfill.export:export_command", "an OverFill pair as a directory that vLLM serves"),
    "build": ("overfill.build:build_command", "the whole pipeline: prune, train, eval, bench, report"),
}


def _load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _or_none(convert: Callable) -> Callable:
    """An argparse type for an Optional field: 'none' or 'null' give None, anything else `convert`."""
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per dataclass field; help from field metadata. An Optional field
    also takes 'none' (or 'null'), so a default can be unset from the command line."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        optional = _unwrap_optional(hints[f.name]) is not hints[f.name]
        tp = _unwrap_optional(hints[f.name])
        meta = dict(f.metadata)
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "*" if meta.get("positional") else "+"
            kwargs["type"] = get_args(tp)[0]
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
        if optional and tp is not bool and "type" in kwargs:
            kwargs["type"] = _or_none(kwargs["type"])
            if "choices" in kwargs:
                kwargs["choices"] = [*kwargs["choices"], None]
            kwargs["help"] += " ('none' to unset)" if kwargs["help"] else ""
        if meta.get("positional"):
            if has_default and "nargs" not in kwargs:
                kwargs["nargs"] = "?"
            if has_default:
                kwargs["default"] = default
            parser.add_argument(f.name, metavar=meta.get("metavar", f.name.upper()), **kwargs)
        else:
            flag = "--" + f.name.replace("_", "-")
            if has_default:
                kwargs["default"] = default
                if kwargs["help"] and default not in (None, "", [], False):
                    kwargs["help"] += f" (default: {default})"
            else:
                kwargs["required"] = True
            parser.add_argument(flag, dest=f.name, **kwargs)


def _args_class(fn: Callable) -> type:
    params = list(inspect.signature(fn).parameters.values())
    return get_type_hints(fn)[params[0].name]


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
    cls = _args_class(fn)
    parser = argparse.ArgumentParser(prog=f"overfill {name}", description=COMMANDS[name][1])
    add_dataclass_arguments(parser, cls)
    ns = parser.parse_args(rest)
    try:
        args = cls(**vars(ns))
        result = fn(args)
    except OverfillError as e:
        print(f"overfill {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"overfill {name}: interrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
