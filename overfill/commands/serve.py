"""`overfill serve`: the OpenAI-compatible server on a pair (or the full model alone)."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..device import INFERENCE_PRECISION_HELP, decode_path, pick_device, resolve_precision
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
        "help": "run the decode step compiled: the batch runs on its rows rounded up to a power of two, and each "
                "such size, cache length and sampling kind compiles once (tens of seconds on a CPU)"})
    warmup: bool = field(default=True, metadata={
        "help": "with --compile, compile the greedy step for every row count before listening, so that no "
                "request waits for it"})


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
    log.info("precision %s (%s); %s", precision.name, precision.reason, decode_path(device, precision))
    if args.compile and args.warmup:
        start = time.perf_counter()
        buckets = app.state.server.scheduler.batcher.warm_up()
        log.info("compiled the decode step for %d row counts in %.0f s", buckets, time.perf_counter() - start)
    log.info("serving '%s' on http://%s:%d/v1 (max batch %d, %s, API key %s)", name, host, port, args.max_batch,
             "two-stage" if model.is_two_stage else "full model alone", "required" if api_key else "off")
    server = uvicorn_server(app, log_level="info", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server.run(sockets=[sock])
