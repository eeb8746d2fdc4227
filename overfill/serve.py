"""An OpenAI-compatible HTTP server for a two-stage model (FastAPI + uvicorn).

    POST /v1/chat/completions   messages through the model's chat template; streaming or not
    POST /v1/completions        raw text (or token ids); streaming or not
    GET  /v1/models             the one served model
    GET  /health                liveness and the scheduler's counters (no API key needed)

Continuous batching. One scheduler thread owns the model and one static KV cache of
`max_batch` rows. The live requests are rows `0..n-1` and every decode step writes one
shared column (slot) for all of them, as in `BatchDecoder`; each row keeps its own rotary
positions and its own valid-slot mask, so where its tokens sit does not change what it
computes. At every step boundary the scheduler

- frees the rows of requests that finished, failed or whose client went away (the last row
  moves into the hole, so the live rows stay a prefix and the step runs on them only);
- admits waiting requests, first come first served, while a row is free: the newcomers are
  prefilled together by the full model in a scratch cache of their own, then copied into
  free rows right-aligned to end at the current column, and from the next step on they
  decode with everyone else. A prompt longer than the current column shifts the live
  columns right; a dead prefix (columns no live row reads any more) wider than the live
  span is reclaimed by moving the live columns left. The cache grows by doubling up to the
  context window. A newcomer needs only a free row and a prompt shorter than the context
  window: nothing is reserved for the tokens it may write.

That is enough because a row's columns are its prompt and output, which never exceed the
window (its `max_new` sees to that), and the live span is the longest live row. When the
column reaches the end of the window (an old row has finished, a young one goes on), the
live columns move back to column 0 and there is room again.

A prefill runs between two decode steps (no chunked prefill), so a long prompt delays the
running rows by its prefill time. With `refresh_every = K` the full model re-processes the
last K columns of every row every K steps of the batch: each decoded token is refreshed
once, within K steps of being written, though not on the same phase as `generate()`.

The event loop only parses and answers: a body over `max_body_bytes` gets a 413 before it is
read, prompts are templated and tokenized in worker threads, and a text too long for the
window by its character count alone is refused before it is tokenized (`PromptEncoder`).
On shutdown, running requests get `SHUTDOWN_DRAIN_S` to finish, then an error event and
[DONE].
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import operator
import os
import queue
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, ClassVar, Literal

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from .errors import OverfillError
from .device import INFERENCE_PRECISION_HELP, inference_precision, pick_device
from .generate import SamplingParams, TextState, decode_step, encode, prefill, refresh, sample
from .kv_cache import KVCache
from .model import positions_from_padding
from .two_stage import TwoStageModel

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks whether its client is still there."""
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for /v1/completions (chat defaults to the rest of the context)."""
DEFAULT_MAX_BODY_BYTES = 4 << 20
"""Largest request body: JSON parsing and validation run on the event loop, so this bounds their stall."""
REQUEST_HEAD_TIMEOUT_S = 10.0
"""A connection must send a whole request head this soon after it opens (or after its last response)."""
BODY_TIMEOUT_S = 30.0
"""Longest wait for the next piece of a request body before a 408."""
SHUTDOWN_DRAIN_S = 5.0
"""On SIGTERM, how long running requests may go on before they are ended with an error event."""
GRACEFUL_SHUTDOWN_S = 10
"""How long uvicorn waits for open connections on shutdown (more than the drain, so that streams end cleanly)."""
SHUTTING_DOWN = "the server is shutting down"


# ---------------------------------------------------------------------------- the batch

@dataclass(frozen=True)
class Event:
    """What a request hears from the scheduler: text pieces, then one event with `finish_reason` or `error`."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request handed to the scheduler. `sink` must be thread-safe; set `cancelled` to stop it."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: bool = False


@dataclass(eq=False)
class Row:
    """A job holding a row of the batch."""

    job: Job
    state: TextState
    generator: torch.Generator | None
    start: int = 0
    """Column of its first prompt token."""
    last: int = 0
    """The token to feed at the next step."""
    generated: int = 0
    failed: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.job.prompt_ids)

    @property
    def position(self) -> int:
        """Rotary position of `last`."""
        return self.prompt_len + self.generated - 1

    @property
    def over(self) -> bool:
        return self.failed or self.state.done or self.job.cancelled


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    """Decode steps."""
    row_steps: int = 0
    """Rows summed over decode steps (row_steps / steps is the mean batch)."""
    joined_running: int = 0
    """Requests admitted while other rows were decoding."""
    peak_rows: int = 0


def first_rows(cache: KVCache, n: int) -> KVCache:
    """A view of the cache's first `n` rows: no copy, a step writes into the shared buffers."""
    view = KVCache.__new__(KVCache)
    view.k, view.v, view.valid = [k[:n] for k in cache.k], [v[:n] for v in cache.v], cache.valid[:n]
    return view


class ContinuousBatcher:
    """The two-stage loop over a batch that requests join and leave at step boundaries (see the module doc)."""

    def __init__(self, model: TwoStageModel, max_batch: int = 16, refresh_every: int | None = None,
                 initial_len: int = 256):
        if max_batch < 1:
            raise OverfillError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.refresh_every = model.config.refresh_every if refresh_every is None else refresh_every
        self.window = model.context_window
        self.device = model.device
        self.rows: list[Row] = []
        self.column = 0
        """The slot every live row writes at the next step."""
        self.stats = Stats()
        self.cache, self.slot_tokens, self.slot_positions = self._buffers(min(initial_len, self.window))

    def _buffers(self, length: int) -> tuple[KVCache, Tensor, Tensor]:
        cache = self.model.full.new_kv_cache(self.max_batch, length)
        tokens = torch.zeros((self.max_batch, length), dtype=torch.long, device=self.device)  # [B, S]
        return cache, tokens, torch.zeros_like(tokens)  # the token in each slot and its position (for refresh)

    # ------------------------------------------------------------ admission

    def max_new(self, job: Job) -> int:
        return min(job.params.max_new_tokens, self.window - len(job.prompt_ids))

    def admit(self, waiting: deque[Job]) -> int:
        """Prefill waiting jobs, in order, into free rows while they fit; the number admitted."""
        batch: list[Job] = []
        while waiting and len(self.rows) + len(batch) < self.max_batch:
            job = waiting[0]
            if job.cancelled:
                waiting.popleft()
                self.stats.cancelled += 1
            elif len(job.prompt_ids) >= self.window or not job.prompt_ids:
                waiting.popleft()
                self.fail_job(job, f"a prompt of {len(job.prompt_ids)} tokens does not fit the context window "
                                f"of {self.window}")
            else:
                batch.append(waiting.popleft())
        if batch:
            self._join(batch)
        return len(batch)

    def _lo(self) -> int:
        """First column a live row still reads."""
        return min((r.start for r in self.rows), default=self.column)

    @torch.inference_mode()
    def _join(self, jobs: list[Job]) -> None:
        T = max(len(j.prompt_ids) for j in jobs)
        tokens = torch.full((len(jobs), T), self.model.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(tokens)  # left-padded [k, T]
        for i, job in enumerate(jobs):
            tokens[i, T - len(job.prompt_ids):] = torch.tensor(job.prompt_ids, device=self.device)
            mask[i, T - len(job.prompt_ids):] = 1
        try:
            scratch = self.model.full.new_kv_cache(len(jobs), T)
            logits = prefill(self.model.full, scratch, tokens, mask)  # [k, V]
        except Exception as e:  # e.g. out of memory: only these newcomers fail, and each on its own
            if len(jobs) > 1:
                for job in jobs:
                    self._join([job])
                return
            log.exception("prefill failed")
            self.fail_job(jobs[0], f"prefill failed: {e}")
            return
        self.stats.prompt_tokens += sum(len(j.prompt_ids) for j in jobs)
        rows = [self._new_row(job) for job in jobs]
        for row, row_logits in zip(rows, logits):
            self._take(row, row_logits)
        keep = [i for i, row in enumerate(rows) if not row.over]
        self.stats.joined_running += len(keep) if self.rows else 0
        for row in rows:
            if row.over:
                self._count(row)  # done at the first token: it never takes a row
        if keep:
            self._place([rows[i] for i in keep], scratch, tokens, mask, keep)

    def _new_row(self, job: Job) -> Row:
        params = job.params
        state = TextState(self.model.tokenizer, params, self.max_new(job), self.model.eos_token_ids,
                          len(job.prompt_ids))
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        return Row(job, state, generator)

    def _place(self, rows: list[Row], scratch: KVCache, tokens: Tensor, mask: Tensor, picks: list[int]) -> None:
        """Copy the newcomers' prompt K/V into free rows, ending at the current column."""
        T = tokens.shape[1]
        self._make_room(T)
        n, s = len(self.rows), self.column
        new, idx = slice(n, n + len(rows)), torch.tensor(picks, device=self.device)
        for dst, src in zip(self.cache.k + self.cache.v, scratch.k + scratch.v):
            dst[new, :, s - T:s] = src[idx]  # [k, H_kv, T, D]
        self.cache.valid[new] = False
        self.cache.valid[new, s - T:s] = scratch.valid[idx]
        self.slot_tokens[new, s - T:s] = tokens[idx]
        self.slot_positions[new, s - T:s] = positions_from_padding(mask)[idx]
        for row in rows:
            row.start = s - row.prompt_len
        self.rows += rows
        self.stats.peak_rows = max(self.stats.peak_rows, len(self.rows))

    def _make_room(self, T: int) -> None:
        """Arrange the live columns so that a prompt of T tokens ends at the current column."""
        lo = self._lo()
        width = self.column - lo
        target = lo
        if T > self.column or lo >= width:
            target = max(0, T - width)
        self._ensure_capacity(max(self.column, target + width))
        if target != lo:
            self._move(lo, target)

    def _move(self, lo: int, target: int) -> None:
        """Move the live columns `[lo, column)` of every live row to start at `target`."""
        n, width = len(self.rows), self.column - lo
        src, dst = slice(lo, self.column), slice(target, target + width)
        for buf in self.cache.k + self.cache.v:
            buf[:n, :, dst] = buf[:n, :, src].clone()
        for buf in (self.cache.valid, self.slot_tokens, self.slot_positions):
            buf[:n, dst] = buf[:n, src].clone()
        self.cache.valid[:n, :target] = False
        self.cache.valid[:n, target + width:] = False
        for row in self.rows:
            row.start += target - lo
        self.column = target + width

    def _ensure_capacity(self, need: int) -> None:
        old = self.cache.max_len
        if need <= old:
            return
        cache, tokens, positions = self._buffers(min(self.window, max(need, 2 * old)))
        for dst, src in zip(cache.k + cache.v, self.cache.k + self.cache.v):
            dst[:, :, :old] = src
        cache.valid[:, :old] = self.cache.valid
        tokens[:, :old], positions[:, :old] = self.slot_tokens, self.slot_positions
        self.cache, self.slot_tokens, self.slot_positions = cache, tokens, positions

    # ------------------------------------------------------------ decoding

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every live row; then sample, hand out text and free finished rows."""
        if self.column == self.window:  # the live span is shorter than the window: start over at column 0
            self._move(self._lo(), 0)
        n, s = len(self.rows), self.column
        last = torch.tensor([r.last for r in self.rows], device=self.device)  # [n]
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)  # [n, 1]
        try:
            self._ensure_capacity(s + 1)
            live = first_rows(self.cache, n)
            logits = decode_step(self.model.decoder, live.select_layers(self.model.layer_map), last[:, None],
                                 positions, torch.tensor([s], device=self.device), kv_len=s + 1)  # [n, V]
            self.slot_tokens[:n, s], self.slot_positions[:n, s] = last, positions[:, 0]
            self.column += 1
            self.stats.steps += 1
            self.stats.row_steps += n
            self._maybe_refresh(live)
        except Exception as e:  # the batch as a whole failed (e.g. out of memory)
            log.exception("decode step failed")
            self.fail_all(f"decode step failed: {e}")
            return
        for row, row_logits in zip(self.rows, logits):
            self._take(row, row_logits)
        self.retire()

    def _maybe_refresh(self, live: KVCache) -> None:
        K, c, n = self.refresh_every, self.column, len(self.rows)
        if K and self.model.is_two_stage and self.stats.steps % K == 0 and c >= K:
            refresh(self.model.full, live, self.slot_tokens[:n, c - K:c], self.slot_positions[:n, c - K:c], c - K)

    def _take(self, row: Row, logits: Tensor) -> None:
        """Sample the row's next token from its logits `[V]` and hand its text out; errors stay in the row."""
        try:
            token = int(sample(logits[None], [row.job.params], [row.generator])[0])
            row.last, row.generated = token, row.generated + 1
            piece = row.state.add(token)
        except Exception as e:
            log.exception("sampling failed")
            row.failed = True
            self._emit(row.job, Event(error=f"sampling failed: {e}"))
            return
        self.stats.generated_tokens += 1
        if piece or row.state.done:
            self._emit(row.job, Event(piece, row.state.finish_reason, row.generated))

    @staticmethod
    def _emit(job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # nobody is listening any more
            job.cancelled = True

    def fail_job(self, job: Job, message: str) -> None:
        self.stats.failed += 1
        self._emit(job, Event(error=message))

    def _count(self, row: Row) -> None:
        if row.failed:
            self.stats.failed += 1
        elif row.state.done:
            self.stats.completed += 1
        else:
            self.stats.cancelled += 1

    def retire(self) -> None:
        """Free the rows of finished, failed and abandoned requests; the last rows move into the holes."""
        for i in reversed(range(len(self.rows))):
            row = self.rows[i]
            if not row.over:
                continue
            self._count(row)
            last = len(self.rows) - 1
            if i != last:
                self._copy_row(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.column = 0

    def _copy_row(self, src: int, dst: int) -> None:
        s = self.column
        for buf in self.cache.k + self.cache.v:
            buf[dst, :, :s] = buf[src, :, :s]
        for buf in (self.cache.valid, self.slot_tokens, self.slot_positions):
            buf[dst, :s] = buf[src, :s]

    def fail_all(self, message: str) -> None:
        for row in self.rows:
            if not row.over:
                row.failed = True
                self._emit(row.job, Event(error=message))
        self.retire()


class Scheduler:
    """Runs a ContinuousBatcher on one background thread; `submit` may be called from any thread."""

    def __init__(self, batcher: ContinuousBatcher):
        self.batcher = batcher
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()
        self._stopping = threading.Event()
        self.drain_deadline: float | None = None
        """Set on shutdown: at this `time.monotonic()`, the requests not done yet end with an error."""
        self._thread = threading.Thread(target=self._run, name="overfill-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def drain(self, seconds: float) -> None:
        """Let the requests already here finish for up to `seconds`, then end them (and any later one) with an
        error. The HTTP server stops taking new ones first."""
        self.drain_deadline = time.monotonic() + seconds

    def submit(self, job: Job) -> None:
        self.batcher.stats.requests += 1
        self.inbox.put(job)

    @property
    def queued(self) -> int:
        return len(self.waiting) + self.inbox.qsize()

    def _run(self) -> None:
        batcher = self.batcher
        while not self._stopping.is_set():
            try:
                self._collect(block=not batcher.rows and not self.waiting)
                batcher.retire()
                if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
                    self._end_all(SHUTTING_DOWN)
                batcher.admit(self.waiting)
                if batcher.rows:
                    batcher.step()
            except Exception as e:  # a bug must not take the server down: fail what is running, go on
                log.exception("scheduler error")
                batcher.fail_all(f"internal error: {e}")
        self._collect(block=False)
        self._end_all(SHUTTING_DOWN)

    def _end_all(self, message: str) -> None:
        while self.waiting:
            self.batcher.fail_job(self.waiting.popleft(), message)
        self.batcher.fail_all(message)

    def _collect(self, block: bool) -> None:
        try:
            if block:
                self.waiting.append(self.inbox.get(timeout=0.05))
            while True:
                self.waiting.append(self.inbox.get_nowait())
        except queue.Empty:
            pass


# ---------------------------------------------------------------------------- the OpenAI API

class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _has_lone_surrogate(data: Any) -> bool:
    """Whether a string (or key) anywhere in parsed JSON holds a lone surrogate; iterative, for deep nesting."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by both endpoints, with OpenAI's names, defaults and ranges."""

    model_config = ConfigDict(extra="forbid")
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "n": (1, None), "presence_penalty": (0, None), "frequency_penalty": (0, None), "logit_bias": (None, {})}
    """Parameters accepted only at these values (anything else is unsupported)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension, as in vLLM
    ignore_eos: bool | None = False  # an extension, as in vLLM: generate max_tokens whatever the model says
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = 1
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None

    def reject_unsupported(self) -> None:
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value not in neutral:
                raise APIError(400, f"'{name}': {json.dumps(value)} is not supported by this server",
                               param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):  # JSON allows "\ud800"; neither the tokenizer nor a UTF-8 reply can take it
            raise ValueError("the request holds a lone UTF-16 surrogate, which is not valid Unicode")
        return data

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        return stop


class CompletionRequest(_GenerationRequest):
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **_GenerationRequest.NEUTRAL, "logprobs": (None,), "echo": (False, None), "best_of": (None, 1),
        "suffix": (None, "")}

    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_GenerationRequest):
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **_GenerationRequest.NEUTRAL, "logprobs": (None, False), "top_logprobs": (None,),
        "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
        "function_call": (None, "none"), "response_format": (None, {"type": "text"})}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None


@dataclass
class Reply:
    """The OpenAI JSON objects of one response (chat or text completion) and its log line."""

    chat: bool
    model: str
    prompt_tokens: int
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    first_text_at: float | None = None

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _object(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if self.chat else \
            {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        kind = "chat.completion" if self.chat else "text_completion"
        return self._object(kind, [choice], usage=self.usage(completion_tokens))

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            delta.update({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        extra = {"usage": None} if self.include_usage else {}
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    def usage_chunk(self, completion_tokens: int) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                            usage=self.usage(completion_tokens))

    def saw_text(self) -> None:
        self.first_text_at = self.first_text_at or time.perf_counter()

    def log(self, outcome: str, completion_tokens: int) -> None:
        now = time.perf_counter()
        ttft = (self.first_text_at or now) - self.started
        log.info("%s %s prompt=%d completion=%d ttft=%.0fms total=%.0fms", self.id, outcome, self.prompt_tokens,
                 completion_tokens, ttft * 1e3, (now - self.started) * 1e3)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events_while_connected(events: asyncio.Queue, request: Request) -> AsyncIterator[Event]:
    """A job's events up to its last one; they stop early once the client has gone away."""
    checked = time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            event = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:  # even while tokens keep coming
            if await request.is_disconnected():
                return
            checked = time.monotonic()
        if event is not None:
            yield event
            if event.error or event.finish_reason:
                return


class PromptEncoder:
    """Prompt text to token ids, in a worker thread, refusing a text that surely exceeds the context window
    before tokenizing it.

    One token stands for at most `longest` characters of normalized text: the longest vocabulary
    entry or added token (for byte-level BPE an entry's length counts bytes, which over-counts
    characters). So a text of more than `window * longest * shrink` characters has more than
    `window` tokens, where `shrink` bounds how much the tokenizer's normalizer can shorten a
    text: 1 for none, 4 for NFC/NFKC (which compose at most 4 code points into one). With a
    normalizer that can shorten text without bound there is no such limit, and the body-size
    limit bounds the tokenizer's work instead.
    """

    SHRINK: ClassVar[dict[str, int]] = {"NFC": 4, "NFKC": 4, "NFD": 1, "NFKD": 1, "Prepend": 1, "Lowercase": 1}

    def __init__(self, tokenizer, window: int):
        self.tokenizer, self.window = tokenizer, window
        shrink = self._shrink(json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer")) \
            if hasattr(tokenizer, "backend_tokenizer") else None
        self.max_chars = window * self._longest_token() * shrink if shrink else None

    def _longest_token(self) -> int:
        added = [len(t.content) for t in self.tokenizer.added_tokens_decoder.values()]
        return max([len(k) for k in self.tokenizer.get_vocab()] + added)

    @classmethod
    def _shrink(cls, normalizer: dict | None) -> int | None:
        """The most the normalizer can shorten a text by (None: no bound)."""
        if normalizer is None:
            return 1
        kind = normalizer.get("type")
        if kind == "Sequence":
            factors = [cls._shrink(n) for n in normalizer["normalizers"]]
            return None if None in factors else functools.reduce(operator.mul, factors, 1)
        if kind == "Replace" and set(normalizer["pattern"]) == {"String"} and normalizer["content"]:
            return max(1, -(-len(normalizer["pattern"]["String"]) // len(normalizer["content"])))
        return cls.SHRINK.get(kind)

    async def chat(self, messages: list[dict]) -> list[int]:
        return await asyncio.to_thread(self._chat, messages)

    async def text(self, prompt: str) -> list[int]:
        return await asyncio.to_thread(self._text, prompt)

    def _chat(self, messages: list[dict]) -> list[int]:
        try:  # the rendered text is what gets tokenized, so the bound holds whatever the template does
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may refuse a conversation (e.g. roles that do not alternate)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        self._check_length(text, "messages")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text(self, prompt: str) -> list[int]:
        self._check_length(prompt, "prompt")
        try:
            return encode(self.tokenizer, prompt, chat=False)
        except OverfillError as e:
            raise APIError(400, str(e), param="prompt") from None

    def _check_length(self, text: str, param: str) -> None:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise APIError(400, f"This model's maximum context length is {self.window} tokens, but the prompt has "
                                f"{len(text)} characters, which is surely more. Please shorten the prompt.",
                           param=param, code="context_length_exceeded")


class OpenAIServer:
    """The endpoints: validation, tokenisation, and turning a job's events into OpenAI responses."""

    def __init__(self, model: TwoStageModel, model_name: str, scheduler: Scheduler):
        self.model, self.model_name, self.scheduler = model, model_name, scheduler
        self.prompts = PromptEncoder(model.tokenizer, model.context_window)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "overfill"}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    async def get_model(self, model: str) -> dict:
        self._check_model(model)
        return self.model_card()

    async def health(self) -> dict:
        batcher = self.scheduler.batcher
        stats = asdict(batcher.stats)
        return {"status": "ok", "model": self.model_name, "max_batch": batcher.max_batch,
                "active": len(batcher.rows), "queued": self.scheduler.queued,
                "mean_batch": stats["row_steps"] / max(stats["steps"], 1), **stats}

    async def chat_completions(self, body: ChatRequest, request: Request):
        self._check(body)
        prompt_ids = await self.prompts.chat([m.as_template_input() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._respond(request, body, prompt_ids, max_tokens, self.model.context_window, chat=True)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported (send several requests)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await self.prompts.text(prompt)
        else:
            prompt_ids = self._check_token_ids(prompt)
        return await self._respond(request, body, prompt_ids, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                   chat=False)

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check(self, body: _GenerationRequest) -> None:
        self._check_model(body.model)
        body.reject_unsupported()

    def _check_token_ids(self, ids: list[int]) -> list[int]:
        vocab = self.model.full.args.vocab_size
        if len(ids) >= self.model.context_window:
            return ids  # refused by `_params`, without scanning all of them here
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"a token-id prompt must be a non-empty list of ids in [0, {vocab})", param="prompt")
        return ids

    def _params(self, body: _GenerationRequest, prompt_len: int, max_tokens: int | None, default_max: int,
                prompt_param: str) -> SamplingParams:
        window = self.model.context_window
        if prompt_len >= window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but the prompt has "
                                f"{prompt_len} tokens. Please shorten the prompt.", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max, window - prompt_len)
        if prompt_len + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
                                f"the completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(max_tokens, temperature, body.top_k or 0, body.top_p or 1.0, body.seed,
                                body.stop_strings(), ignore_eos=bool(body.ignore_eos))
        try:
            return params.validate()
        except OverfillError as e:
            raise APIError(400, str(e)) from None

    async def _respond(self, request: Request, body: _GenerationRequest, prompt_ids: list[int],
                       max_tokens: int | None, default_max: int, chat: bool) -> Response:
        params = self._params(body, len(prompt_ids), max_tokens, default_max, "messages" if chat else "prompt")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(prompt_ids, params, sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        reply = Reply(chat, self.model_name, len(prompt_ids), include_usage)
        self.scheduler.submit(job)
        if body.stream:
            return StreamingResponse(self._stream(job, events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            pieces: list[str] = []
            async for event in _events_while_connected(events, request):
                if event.error:
                    reply.log("error", 0)
                    raise APIError(500, event.error, type="server_error")
                if event.text:
                    reply.saw_text()
                pieces.append(event.text)
                if event.finish_reason:
                    reply.log(event.finish_reason, event.completion_tokens)
                    return JSONResponse(reply.whole("".join(pieces), event.finish_reason, event.completion_tokens))
            reply.log("disconnected", 0)
            return Response(status_code=499)  # nobody is there to read it
        finally:
            job.cancelled = True  # no-op once finished; otherwise frees the row

    async def _stream(self, job: Job, events: asyncio.Queue, reply: Reply) -> AsyncIterator[str]:
        outcome, tokens = "disconnected", 0
        try:
            if reply.chat:
                yield _sse(reply.chunk(text="", role=True))
            while True:
                event: Event = await events.get()
                if event.error:  # e.g. shutdown: the client still learns that the stream is over
                    outcome = "error"
                    yield _sse(APIError(500, event.error, type="server_error").body())
                    yield "data: [DONE]\n\n"
                    return
                if event.text:
                    reply.saw_text()
                    yield _sse(reply.chunk(text=event.text))
                if event.finish_reason:
                    outcome, tokens = event.finish_reason, event.completion_tokens
                    yield _sse(reply.chunk(finish_reason=event.finish_reason))
                    if reply.include_usage:
                        yield _sse(reply.usage_chunk(event.completion_tokens))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # also when the client disconnects: the cancelled stream stops its row
            job.cancelled = True
            reply.log(outcome, tokens)


# ---------------------------------------------------------------------------- the app

class _Gate:
    """ASGI middleware: the API key on everything but /health, and one access-log line per request with its latency."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
                error = APIError(401, "Invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            log.info("%s %s %d %.1fms", scope["method"], scope["path"], status[0], (time.perf_counter() - start) * 1e3)

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(key.strip().encode(), self.api_key.encode())


class _BodyLimit:
    """ASGI middleware: read the request body, refusing one of more than `max_bytes` with a 413, before the app
    parses it. A declared Content-Length is checked before reading; a chunked body as it arrives. What the
    client still sends after the 413 is read and dropped by uvicorn, so that it gets to read the answer."""

    def __init__(self, app, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:  # the HTTP layer checked it is a number
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:  # a client that stopped sending half-way would hold its slot forever
                error = APIError(408, f"The request body did not arrive within {self.timeout_s:g} s.",
                                 code="request_timeout")
                return await JSONResponse(error.body(), status_code=408, headers={"connection": "close"})(
                    scope, receive, send)
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # from here on only http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        error = APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes "
                              f"(--max-body-bytes).", code="request_too_large")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _validation_error(error: dict) -> APIError:
    loc = [str(p) for p in error["loc"] if p != "body"]
    param = ".".join(loc) or None
    kind = error["type"]
    if kind == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'" if param else "The request body is empty",
                        param=param)
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unsupported_parameter")
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"Invalid value for {where}: {error['msg']}", param=param)


def create_app(model: TwoStageModel, model_name: str = "overfill", api_key: str | None = None,
               max_batch: int = 16, refresh_every: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S):
    """The FastAPI app; its lifespan starts and stops the scheduler thread that owns the model.

    With an API key, the interactive docs are off: a browser cannot send the key, and the
    schema needs no publishing then."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    scheduler = Scheduler(ContinuousBatcher(model, max_batch, refresh_every))
    server = OpenAIServer(model, model_name, scheduler)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="overfill", lifespan=lifespan, **docs)
    app.state.server = server
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(_Gate, api_key=api_key)  # the outermost: no body is read before the key is checked
    app.get("/health")(server.health)
    app.get("/v1/models")(server.list_models)
    app.get("/v1/models/{model}")(server.get_model)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/completions")(server.completions)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(error.errors()[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:  # a bug: still OpenAI's format
        return await api_error(request, APIError(500, f"internal error: {type(error).__name__}", type="server_error"))

    return app


def guarded_http_protocol(head_timeout_s: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head is not complete `head_timeout_s`
    after it opened (or after its last response): uvicorn itself keeps a silent or half-open connection, or
    one that sends its headers a byte at a time, forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            self.loop.call_later(head_timeout_s, self._head_deadline, self.cycle)

        def _head_deadline(self, cycle_then) -> None:
            if self.cycle is cycle_then and not self.transport.is_closing():  # no new request head since
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_server(app, drain_s: float = SHUTDOWN_DRAIN_S, head_timeout_s: float = REQUEST_HEAD_TIMEOUT_S,
                   **config):
    """A uvicorn server whose shutdown (SIGTERM, Ctrl-C) first drains the scheduler: running requests may finish
    for `drain_s`, then end with an error event, so that every stream still ends with [DONE]. A connection
    that has not sent a whole request head within `head_timeout_s` is closed."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            app.state.server.scheduler.drain(drain_s)
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, http=guarded_http_protocol(head_timeout_s), **config))


# ---------------------------------------------------------------------------- `overfill serve`

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
    precision: Literal["default", "auto", "fp32", "bf16"] = field(default="default", metadata={
        "help": INFERENCE_PRECISION_HELP})


def inference_dtype(precision: str, device):
    """The serving dtype, logged with its reason."""
    choice = inference_precision(precision, device)
    log.info("precision %s (%s)", choice.name, choice.reason)
    return choice.dtype


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: any free port), or a clear error when the address is taken."""
    if not 0 <= port <= 65535:
        raise OverfillError(f"--port must be in 0..65535, got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OverfillError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    return sock


def default_model_name(full: str, decoder: str | None) -> str:
    return Path(decoder or full).name or str(decoder or full)


def serve_command(args: ServeArgs) -> None:
    if args.max_batch < 1:
        raise OverfillError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.refresh_every is not None and args.refresh_every < 0:
        raise OverfillError("--refresh-every must be >= 0")
    if args.max_body_bytes < 1:
        raise OverfillError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    api_key = args.api_key or os.environ.get("OVERFILL_API_KEY") or None
    sock = listen_socket(args.host, args.port)  # fail before the slow model load
    device = pick_device(args.device)
    model = TwoStageModel.from_refs(args.full, args.decoder, dtype=inference_dtype(args.precision, device),
                                    device=device)
    name = args.model_name or default_model_name(args.full, args.decoder)
    app = create_app(model, name, api_key, args.max_batch, args.refresh_every, args.max_body_bytes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = sock.getsockname()[:2]
    log.info("serving '%s' on http://%s:%d/v1 (max batch %d, %s, API key %s)", name, host, port, args.max_batch,
             "two-stage" if model.is_two_stage else "full model alone", "required" if api_key else "off")
    server = uvicorn_server(app, log_level="info", access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server.run(sockets=[sock])
