"""`overfill serve`: the OpenAI-compatible server on a pair (or the full model alone)."""
from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..device import INFERENCE_PRECISION_HELP, pick_device, resolve_precision
from ..engine.step import decode_path
from ..engine import ContinuousBatcher, WarmedVariant, use_compile_cache
from ..errors import OverfillError
from ..two_stage import TwoStageModel
from ..serve import DEFAULT_MAX_BODY_BYTES, GRACEFUL_SHUTDOWN_S, create_app, listen_socket, uvicorn_server

log = logging.getLogger("overfill.serve")


@dataclass
class ServeArgs:
    full: str = field(default="smollm2-135m-instruct", metadata={"help": "full model (prefill)"})
    decoder: str | None = field(default=None, metadata={
        "help": "decoder: an OverFill or pruned HF directory (default: the full model decodes alone)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1 (default: $OVERFILL_API_KEY, which keeps the key out "
                "of the process list; neither: no key)"})
    max_batch: int = field(default=16, metadata={"help": "most requests decoded together"})
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata={
        "help": "largest request body in bytes; larger ones get a 413"})
    model_name: str | None = field(default=None, metadata={
        "help": "the name clients pass as 'model' (default: the decoder's, else the full model's name)"})
    refresh_every: int | None = field(default=None, metadata={
        "help": "let the full model re-process every K decoded tokens (default: the decoder's setting)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ... (auto: cuda if available)"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": INFERENCE_PRECISION_HELP})
    compile: bool = field(default=True, metadata={
        "help": "run the decode step compiled: a few graphs (1 row and 2+ rows, each sampling kind; any cache "
                "length), tens of seconds each on a CPU the first time, kept in the compile cache for later starts"})
    warmup: bool = field(default=True, metadata={
        "help": "with --compile, compile every graph before listening, so that no request waits for one "
                "(--no-warmup: requests compile them as they need them)"})


def default_model_name(full: str, decoder: str | None) -> str:
    return Path(decoder or full).name or str(decoder or full)


def given_api_key(flag_value: str | None) -> str | None:
    """--api-key, else $OVERFILL_API_KEY, else None (no key). An empty one is refused, not taken as no
    key: `--api-key "$KEY"` with KEY unset would otherwise start an open server."""
    for source, key in (("--api-key", flag_value), ("OVERFILL_API_KEY", os.environ.get("OVERFILL_API_KEY"))):
        if key is not None:
            if not key.strip():
                raise OverfillError(f"{source} is empty: give the key, or leave {source} out to serve without one")
            return key
    return None


def serve_command(args: ServeArgs) -> None:
    if args.max_batch < 1:
        raise OverfillError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.refresh_every is not None and args.refresh_every < 0:
        raise OverfillError("--refresh-every must be >= 0")
    if args.max_body_bytes < 1:
        raise OverfillError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    api_key = given_api_key(args.api_key)
    sock = listen_socket(args.host, args.port)  # fail before the slow model load
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    model = TwoStageModel.from_refs(args.full, args.decoder, dtype=precision.dtype, device=device)
    name = args.model_name or default_model_name(args.full, args.decoder)
    app = create_app(model, name, api_key, args.max_batch, args.refresh_every, args.max_body_bytes,
                     compile=args.compile)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = sock.getsockname()[:2]
    log.info("precision %s (%s); %s", precision.name, precision.reason, decode_path(device, precision.dtype))
    if args.compile and args.warmup:
        warm_up(app.state.server.scheduler.batcher)
    log.info("serving '%s' on http://%s:%d/v1 (max batch %d, %s, API key %s)", name, host, port, args.max_batch,
             "two-stage" if model.is_two_stage else "full model alone", "required" if api_key else "off")
    server = uvicorn_server(app, log_level="info", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server.run(sockets=[sock])


KIND_NAMES = {"greedy": "greedy", "temperature": "temperature", "filtered": "top-k/top-p"}


def variant_name(rows: int, kind: str) -> str:
    return f"{rows} row{'s' if rows > 1 else ''}, {KIND_NAMES[kind]}"


def compile_workers() -> int:
    """The processes inductor compiles kernels in: one per usable core unless $TORCHINDUCTOR_COMPILE_THREADS says."""
    from torch._inductor import config

    return config.compile_threads


def seconds_left(variants: list[tuple[int, str]], warmed: list[WarmedVariant]) -> float:
    """About how long the variants not warmed yet will take, from those that were: the first variant at a
    row count also compiles the decoder's graph (most of the time), the others a sampler's only."""
    def opens_rows(i: int) -> bool:
        return variants[i][0] not in {rows for rows, _ in variants[:i]}

    seconds = {True: [], False: []}
    for i, variant in enumerate(warmed):
        seconds[opens_rows(i)].append(variant.seconds)
    every = [variant.seconds for variant in warmed]
    return sum(statistics.fmean(seconds[opens_rows(i)] or every) for i in range(len(warmed), len(variants)))


def warm_up(batcher: ContinuousBatcher) -> list[WarmedVariant]:
    """Compile every graph a request can need before listening, saying so, and how long it is taking."""
    variants = batcher.warm_up_variants()
    cache = use_compile_cache()
    log.info("compiling the decode step before listening (connections are refused until then): %d variants (%s), "
             "%d compile workers; compiled graphs are kept in %s for the next start",
             len(variants), "; ".join(variant_name(*v) for v in variants), compile_workers(),
             cache or "torch's default cache")
    start, warmed = time.perf_counter(), []

    def progress(done: int, total: int, variant: WarmedVariant) -> None:
        warmed.append(variant)
        left = f"; about {seconds_left(variants, warmed):.0f} s left" if done < total else ""
        log.info("compiled %d/%d (%s) in %.1f s%s", done, total, variant_name(variant.rows, variant.kind),
                 variant.seconds, left)

    batcher.warm_up(progress)
    log.info("compiled the decode step in %.0f s (%d graphs compiled)", time.perf_counter() - start,
             sum(w.compiles for w in warmed))
    return warmed
