"""`ContinuousBatcher`: the two-stage loop over a batch that requests join and leave at step boundaries.

One static KV cache of `max_batch` rows. The live requests are rows `0..n-1` and every decode
step writes one shared column (slot) for all of them, as in `BatchDecoder`; each row keeps its own
rotary positions and its own valid-slot mask, so where its tokens sit does not change what it
computes. At every step boundary the batcher

- frees the rows of requests that finished, failed or were cancelled (the last row moves into the
  hole, so the live rows stay a prefix and the step runs on them only);
- admits waiting requests, first come first served, while a row is free: the newcomers are
  prefilled together by the full model in a scratch cache of their own, then copied into free rows
  right-aligned to end at the current column, and from the next step on they decode with everyone
  else. A prompt longer than the current column shifts the live columns right; a dead prefix
  (columns no live row reads any more) wider than the live span is reclaimed by moving the live
  columns left. The cache grows by doubling up to the context window. A newcomer needs only a free
  row and a prompt shorter than the window: nothing is reserved for the tokens it may write.

That is enough because a row's columns are its prompt and output, which never exceed the window
(its `max_new` sees to that), and the live span is the longest live row. When the column reaches
the end of the cache while the first live column is past 0, the live columns move back to column 0
instead of the cache growing: the cache stays about as long as the longest live row.

A prefill runs between two decode steps (no chunked prefill). With `refresh_every = K` the full
model re-processes the last K columns of every row every K steps of the batch: each decoded token
is refreshed once, within K steps of being written.

Compiled (`CompiledStep`), a step's graphs depend neither on the cache length nor on the row count
past 2, so `warm_up` makes all of them before the first request. On a GPU a step runs on the live
rows rounded up to a power of two (the rows past the live ones compute and are ignored), so that a
handful of CUDA graphs is recorded.

The batcher knows token ids only: a job's sink gets `TokenEvent`s, and the text layer above it
(the server) turns them into text.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import OverfillError
from ..kv_cache import KVCache
from ..model import decodes_with_layer_stack, positions_from_padding
from ..two_stage import TwoStageModel
from .sampling import SAMPLING_KINDS, Kind, Sampler, SamplingParams, row_seed
from .step import (CompiledStep, compile_count, decode_one_token, finish_reason, first_token, left_pad, mark_cache,
                   prepare_for_decoding, refresh, refresh_due, row_class_of)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """What a job hears: a new token (None after EOS or on an error), and how the job ends, if it does."""

    token: int | None
    generated: int = 0
    finish_reason: str | None = None
    """"stop" (EOS) or "length"."""
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One request. `sink` takes its events, in the batcher's thread, and returns True to end the job (a
    stop string); an exception from it cancels the job. Set `cancelled` from any thread to stop it."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[TokenEvent], bool | None]
    cancelled: bool = False


@dataclass(eq=False)
class Row:
    """A job holding a row of the batch."""

    job: Job
    max_new: int
    seed: int
    start: int = 0
    """Column of its first prompt token."""
    last: int = 0
    """The token to feed at the next step."""
    generated: int = 0
    done: bool = False
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
        return self.failed or self.done or self.job.cancelled


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
    compiles: int = 0
    """Graphs compiled during decode steps (0 after a complete warm-up)."""


@dataclass(frozen=True)
class WarmedVariant:
    """One variant that `ContinuousBatcher.warm_up` ran: its rows and sampling kind, and what it took."""

    rows: int
    kind: Kind
    seconds: float
    compiles: int


def row_bucket(rows: int, max_batch: int) -> int:
    """Rows a compiled step runs on for `rows` live ones: the next power of two, at most `max_batch`."""
    return min(max_batch, 1 << (rows - 1).bit_length())


class ContinuousBatcher:
    """See the module doc. `admit` and `step` are called from one thread."""

    @torch.inference_mode()  # inference tensors, as every step's inputs are
    def __init__(self, model: TwoStageModel, max_batch: int = 16, refresh_every: int | None = None,
                 initial_len: int = 256, compile: bool = False):
        if max_batch < 1:
            raise OverfillError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.refresh_every = model.config.refresh_every if refresh_every is None else refresh_every
        self.window, self.device = model.context_window, model.device
        self.rows: list[Row] = []
        self.column = 0
        """The slot every live row writes at the next step."""
        self.stats = Stats()
        self.compile = compile
        self._step = CompiledStep(self.device.type) if compile else decode_one_token
        prepare_for_decoding(model.full, model.decoder, compile=compile)
        self._sampler: Sampler | None = None
        length = min(initial_len, self.window)
        self._views: dict[int, KVCache] = {}
        self.cache = self._static(model.full.new_kv_cache(max_batch, length))
        # The token in each slot and its position, for refresh.
        self.slot_tokens = torch.zeros((max_batch, length), dtype=torch.long, device=self.device)  # [B, S]
        self.slot_positions = torch.zeros_like(self.slot_tokens)  # [B, S]

    def _static(self, cache: KVCache) -> KVCache:
        """Mark the buffers as inputs of the compiled step (`step.mark_cache`, as `BatchDecoder` does)."""
        if self.compile:
            mark_cache(cache)
        return cache

    def _live(self, rows: int) -> KVCache:
        """The first `rows` rows of the cache, one view per row count, made (and marked static) once."""
        if rows not in self._views:
            self._views[rows] = self._static(self.cache.first_rows(rows))
        return self._views[rows]

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
        tokens, mask = left_pad([j.prompt_ids for j in jobs], self.model.tokenizer.pad_token_id, self.device)
        rows = [Row(job, self.max_new(job), row_seed(job.params)) for job in jobs]
        try:
            scratch = self.model.full.new_kv_cache(len(jobs), tokens.shape[1])
            first = first_token(self.model.full, scratch, tokens, mask, self._sampler_of(rows)).tolist()  # [k]
        except Exception as e:  # e.g. out of memory: only these newcomers fail, and each on its own
            if len(jobs) > 1:
                for job in jobs:
                    self._join([job])
                return
            log.exception("prefill failed")
            self.fail_job(jobs[0], f"prefill failed: {e}")
            return
        self.stats.prompt_tokens += sum(len(j.prompt_ids) for j in jobs)
        for row, token in zip(rows, first):
            self._take(row, token)
        keep = [i for i, row in enumerate(rows) if not row.over]
        self.stats.joined_running += len(keep) if self.rows else 0
        for row in rows:
            if row.over:
                self._count(row)  # done at the first token: it never takes a row
        if keep:
            self._place([rows[i] for i in keep], scratch, tokens, mask, keep)

    def _sampler_of(self, rows: list[Row]) -> Sampler:
        return Sampler([r.job.params for r in rows], [r.seed for r in rows], self.device)

    def _place(self, rows: list[Row], scratch: KVCache, tokens: Tensor, mask: Tensor, picks: list[int]) -> None:
        """Copy the newcomers' prompt K/V into free rows, ending at the current column."""
        T = tokens.shape[1]
        self._make_room(T)
        n, s = len(self.rows), self.column
        new, idx = slice(n, n + len(rows)), torch.tensor(picks, device=self.device)
        self.cache.write_rows(new, s, scratch, idx)
        self.slot_tokens[new, s - T:s] = tokens[idx]
        self.slot_positions[new, s - T:s] = positions_from_padding(mask)[idx]
        for row in rows:
            row.start = s - row.prompt_len
        self.rows += rows
        self._sampler = None
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
        self.cache.move_slots(n, lo, self.column, target)
        for buf in (self.slot_tokens, self.slot_positions):
            buf[:n, target:target + width] = buf[:n, lo:self.column].clone()
        for row in self.rows:
            row.start += target - lo
        self.column = target + width

    def _ensure_capacity(self, need: int) -> None:
        old = self.cache.max_len
        if need <= old:
            return
        length = min(self.window, max(need, 2 * old))
        self.cache, self._views = self._static(self.cache.grown(length)), {}
        for name in ("slot_tokens", "slot_positions"):
            grown = torch.zeros((self.max_batch, length), dtype=torch.long, device=self.device)
            grown[:, :old] = getattr(self, name)
            setattr(self, name, grown)

    def warm_up_variants(self) -> list[tuple[int, Kind]]:
        """(rows, sampling kind) pairs whose steps need, between them, every graph a step can need: each
        kind at the fewest rows of each row class ("1 row", "2+ rows": the row count is a symbolic size
        from 2 on, and so is the cache length) that a step runs compiled; where CUDA graphs replay,
        greedy at every larger row bucket too, each recorded once."""
        pairs = [(rows, kind) for rows in self._first_compiled_rows() for kind in SAMPLING_KINDS]
        if self.compile and self.device.type == "cuda":
            pairs += [(rows, "greedy") for rows in sorted({self._bucket(n) for n in range(3, self.max_batch + 1)})]
        return pairs

    def _first_compiled_rows(self) -> list[int]:
        """The fewest rows of each row class whose step is compiled: the bf16 layer stack runs steps of a few
        rows on a CPU eagerly (`decodes_with_layer_stack`, which holds under inference mode only)."""
        first: dict[str, int] = {}
        with torch.inference_mode():
            for rows in range(1, self.max_batch + 1):
                if not decodes_with_layer_stack(self.model.decoder, rows):
                    first.setdefault(row_class_of(rows), rows)
        return sorted(first.values())

    def warm_up(self, progress: Callable[[int, int, WarmedVariant], None] | None = None) -> list[WarmedVariant]:
        """Decode a few steps of every variant in `warm_up_variants`, so that the compiled graphs are made
        before serving and no request waits for one. `progress(done, total, variant)` hears of each.
        Leaves the batcher empty and its counters at 0.

        Run it with torch's threads as they will be when serving: a graph is guarded on their number, and
        a step on another number compiles again. (inductor compiles with a worker per core regardless.)"""
        variants, warmed = self.warm_up_variants(), []
        for rows, kind in variants:
            start, compiles = time.perf_counter(), compile_count()
            params = SamplingParams(max_new_tokens=4, ignore_eos=True, seed=0, **SAMPLING_KINDS[kind])
            self.admit(deque(Job([1, 2], params, lambda event: False) for _ in range(rows)))
            while self.rows:
                self.step()
            warmed.append(WarmedVariant(rows, kind, time.perf_counter() - start, compile_count() - compiles))
            if progress:
                progress(len(warmed), len(variants), warmed[-1])
        self.stats = Stats()
        return warmed

    # ------------------------------------------------------------ decoding

    def _bucket(self, n: int) -> int:
        """Rows a step runs on for n live ones: n, or where CUDA graphs replay, its power-of-two bucket."""
        return row_bucket(n, self.max_batch) if self.compile and self.device.type == "cuda" else n

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every live row; then hand out the tokens and free finished rows."""
        if self.column == self.cache.max_len and self._lo() > 0:
            # Start over at column 0 rather than grow the cache (or, at the window's end, rather than stop):
            # a step reads every slot of the cache when compiled.
            self._move(self._lo(), 0)
        n, s = len(self.rows), self.column
        compiles = compile_count()
        try:
            self._ensure_capacity(s + 1)
            tokens = self._decode(n, s)
            self.column += 1
            self.stats.steps += 1
            self.stats.row_steps += n
            self._maybe_refresh()
        except Exception as e:  # the batch as a whole failed (e.g. out of memory)
            log.exception("decode step failed")
            self.fail_all(f"decode step failed: {e}")
            return
        finally:
            self.stats.compiles += compile_count() - compiles
        for row, token in zip(self.rows, tokens):
            self._take(row, token)
        self.retire()

    def _decode(self, n: int, s: int) -> list[int]:
        """The decode step at column s on the first n rows; their next tokens."""
        m = self._bucket(n)
        last = torch.zeros(m, dtype=torch.long)  # [m]: rows past n feed token 0 and are ignored
        positions = torch.zeros((m, 1), dtype=torch.long)  # [m, 1]
        last[:n] = torch.tensor([r.last for r in self.rows])
        positions[:n, 0] = torch.tensor([r.position for r in self.rows])
        last, positions = last.to(self.device), positions.to(self.device)
        if self._sampler is None:
            self._sampler = self._sampler_of(self.rows).rows(m)
        live = self._live(m)
        if self.compile:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._step(self.model.decoder, live.select_layers(self.model.layer_map), last[:, None], positions,
                         torch.tensor([s], device=self.device), s + 1, self._sampler)
        self.slot_tokens[:n, s], self.slot_positions[:n, s] = last[:n], positions[:n, 0]
        return out[:n].tolist()

    def _maybe_refresh(self) -> None:
        K, c, n = self.refresh_every, self.column, len(self.rows)
        if self.model.is_two_stage and refresh_due(self.stats.steps, K) and c >= K:
            refresh(self.model.full, self.cache.first_rows(n), self.slot_tokens[:n, c - K:c],
                    self.slot_positions[:n, c - K:c], c - K)

    def _take(self, row: Row, token: int) -> None:
        """Hand the row's new token to its job; errors stay in the row."""
        row.generated += 1
        row.last = token
        reason = finish_reason(token, row.job.params, self.model.eos_token_ids, row.generated, row.max_new)
        event = TokenEvent(None if reason == "stop" else token, row.generated, reason)
        self.stats.generated_tokens += 1
        try:
            stop = row.job.sink(event)
        except Exception:  # nobody is listening any more
            row.job.cancelled = True
            return
        row.done = reason is not None or bool(stop)

    @staticmethod
    def _emit(job: Job, event: TokenEvent) -> None:
        try:
            job.sink(event)
        except Exception:
            job.cancelled = True

    def fail_job(self, job: Job, message: str) -> None:
        self.stats.failed += 1
        self._emit(job, TokenEvent(None, error=message))

    def _count(self, row: Row) -> None:
        if row.failed:
            self.stats.failed += 1
        elif row.done:
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
            self._sampler = None
        if not self.rows:
            self.column = 0

    def _copy_row(self, src: int, dst: int) -> None:
        s = self.column
        self.cache.copy_row(src, dst, s)
        for buf in (self.slot_tokens, self.slot_positions):
            buf[dst, :s] = buf[src, :s]

    def fail_all(self, message: str) -> None:
        for row in self.rows:
            if not row.over:
                row.failed = True
                self._emit(row.job, TokenEvent(None, error=message))
        self.retire()
