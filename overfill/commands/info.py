"""`overfill info`: the sizes of a model, and whether a decoder can read a full model's KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import OverfillError


@dataclass
class InfoArgs:
    models: list[str] = field(default_factory=list, metadata={
        "help": "one model reference, or a full model and a decoder to check cache compatibility",
        "positional": True})


def info_command(args: InfoArgs) -> None:
    from ..hub import resolve
    from ..model import ModelArgs, read_config
    from ..two_stage import check_compatible, describe, layer_map_of

    if not 1 <= len(args.models) <= 2:
        raise OverfillError("give one model, or a full model and a decoder")
    dirs = [resolve(m) for m in args.models]
    described = [ModelArgs.from_hf(read_config(d)) for d in dirs]
    for ref, model_args in zip(args.models, described):
        print(f"{ref}:")
        for key, value in describe(model_args).items():
            print(f"  {key:26s} {value:,}" if isinstance(value, int) else f"  {key:26s} {value}")
    if len(described) == 2:
        problems = check_compatible(*described, layer_map=layer_map_of(dirs[1]))
        ratio = described[1].num_params() / described[0].num_params()
        print(f"decoder/full parameters: {ratio:.3f}")
        print("KV cache: compatible" if not problems else "KV cache: NOT compatible: " + "; ".join(problems))
