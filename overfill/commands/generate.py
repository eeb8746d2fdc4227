"""`overfill generate`: two-stage generation from a prompt or a chat message, printed or streamed."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from ..device import INFERENCE_PRECISION_HELP, pick_device, resolve_precision
from ..engine.step import decode_path
from ..engine import SamplingParams
from ..errors import OverfillError
from ..generate import generate, stream
from ..two_stage import TwoStageModel


@dataclass
class GenerateArgs:
    prompt: str = field(metadata={"help": "the prompt (a user message unless --raw)", "positional": True})
    full: str = field(default="smollm2-135m-instruct", metadata={"help": "full model (prefill)"})
    decoder: str | None = field(default=None, metadata={
        "help": "decoder: an OverFill or pruned HF directory (default: the full model decodes alone)"})
    system: str | None = field(default=None, metadata={"help": "system message"})
    raw: bool = field(default=False, metadata={"help": "plain text prompt, no chat template"})
    max_new_tokens: int = field(default=256, metadata={"help": "maximum number of new tokens"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    stream: bool = field(default=False, metadata={"help": "print the text as it is generated"})
    refresh_every: int | None = field(default=None, metadata={
        "help": "let the full model re-process every K decoded tokens (default: the decoder's setting)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ... (auto: cuda if available)"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": INFERENCE_PRECISION_HELP})


def generate_command(args: GenerateArgs) -> None:
    device = pick_device(args.device)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            list(args.stop)).validate()
    if args.refresh_every is not None and args.refresh_every < 0:
        raise OverfillError("--refresh-every must be >= 0")
    precision = resolve_precision(args.precision, device)
    print(f"precision {precision.name} ({precision.reason}); {decode_path(device, precision.dtype)}", file=sys.stderr)
    model = TwoStageModel.from_refs(args.full, args.decoder, dtype=precision.dtype, device=device)
    prompt: str | list[dict] = args.prompt
    if not args.raw and args.system is not None:
        prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}]
    if args.stream:
        for piece in stream(model, prompt, params, chat=not args.raw, refresh_every=args.refresh_every):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(generate(model, [prompt], params, chat=not args.raw, refresh_every=args.refresh_every)[0].text)
