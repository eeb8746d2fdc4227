"""Evaluation: the full model, the pruned decoder alone, and OverFill, on the same requests.

    full      the full model reads the context and scores the continuation
    decoder   the pruned decoder alone does both: the baseline at equal decode cost
    overfill  the full model prefills the context and predicts the first continuation
              token (as in generation); the decoder scores the rest, reading the full
              model's KV cache

Benchmarks are scored as lm-evaluation-harness scores them (the same tokenisation of
(context, continuation) pairs, `acc` / `acc_norm` for multiple choice, `acc` / `perplexity`
for LAMBADA), so the numbers compare with published harness results; `lm_eval_adapter`
puts the same scoring core behind the harness itself. Chat quality is measured on held-out
chats: perplexity of the reference responses and agreement with the full model.

Requests that share a context (the options of a question) share one prefill: the context
is read once, its KV cache copied to each option's row, and only the option's tokens run
through the scoring model. This is what makes a benchmark run cheap.
"""
from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from .data import Example, load_examples
from .errors import OverfillError
from .device import AUTO_PRECISION_HELP, pick_device, resolve_precision
from .engine import SamplingParams, left_pad, prefill
from .generate import stream_batch
from .model import causal_mask, positions_from_padding, weights_fingerprint
from .report import RESULTS_FORMAT
from .tasks import DEFAULT_SUITE, Task, load_task
from .two_stage import TwoStageConfig, TwoStageModel

Mode = Literal["full", "decoder", "overfill"]
MODES: tuple[Mode, ...] = ("full", "decoder", "overfill")
MODE_LABELS = {"full": "full", "decoder": "pruned", "overfill": "OverFill"}

MAX_BATCH_TOKENS = 16384
"""At most this many (row x padded length) tokens per forward pass, whatever the batch size."""
LOGIT_CHUNK = 512
"""Positions per lm_head call: [512, 49152] fp32 logits are 100 MB, a whole batch's would be GBs."""

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


# ---------------------------------------------------------------------------- modes

def resolve_mode(mode: Mode | None, has_decoder: bool) -> Mode:
    """The mode to run: the one asked for, else overfill with a decoder and full without."""
    if mode is None:
        return "overfill" if has_decoder else "full"
    if mode not in MODES:
        raise OverfillError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
    if mode != "full" and not has_decoder:
        raise OverfillError(f"mode '{mode}' needs a decoder (--decoder: a pruned or OverFill model directory)")
    return mode


def in_mode(model: TwoStageModel, mode: Mode | None) -> TwoStageModel:
    """The pair that runs `mode`: its `.full` reads the context, its `.decoder` the continuation."""
    mode = resolve_mode(mode, model.is_two_stage)
    if mode == "overfill":
        return model
    alone = model.full if mode == "full" else model.decoder
    return TwoStageModel(alone, None, model.tokenizer, TwoStageConfig(full=model.config.full), model.eos_token_ids)


# ---------------------------------------------------------------------------- tokenisation

def prefix_token_id(tokenizer) -> int:
    """The token that stands for an empty context (the harness's choice: BOS, else EOS)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids as lm-evaluation-harness's `hf` model gets them.

    add_special_tokens=None: the tokenizer's own default (a BOS where the tokenizer adds one),
    except for a text that already starts with the prefix token.
    """
    if add_special_tokens is None:
        add_special_tokens = not text.startswith(tokenizer.decode(prefix_token_id(tokenizer)))
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split exactly as lm-evaluation-harness splits them.

    The pair is encoded whole and cut after the context's tokens, so the boundary token is
    the one the text really has; trailing spaces of the context move to the continuation
    (" Paris" is one token, "Answer: " + "Paris" would not be). An empty context becomes the
    prefix token.
    """
    if not context:
        continuation_ids = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if continuation_ids[:1] == [prefix]:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok_encode(tokenizer, context + continuation)
    context_ids = tok_encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def fit_window(context: Sequence[int], continuation: Sequence[int], window: int) -> tuple[list[int], list[int]]:
    """Cut the context from the left so that context + continuation[:-1] fits `window` tokens (the harness's rule)."""
    if not continuation:
        raise OverfillError("empty continuation: there is nothing to score")
    if not context:
        raise OverfillError("empty context: give at least one token (the harness uses BOS for an empty one)")
    if len(continuation) > window:
        raise OverfillError(f"a continuation of {len(continuation)} tokens does not fit the context window "
                            f"of {window} tokens")
    return list(context[-(window + 1 - len(continuation)):]), list(continuation)


# ---------------------------------------------------------------------------- scoring core

@dataclass
class _Forward:
    """One batch after its forward passes: what predicts each continuation token.

    Token 0 of row r is predicted by the context reader's logits after the row's context,
    token j > 0 by the continuation scorer's hidden state at token j - 1.
    """

    first_logits: Tensor  # [R, V]
    first_targets: Tensor  # [R]
    rest_hidden: Tensor  # [N, D]: the valid continuation inputs of all rows, row-major
    rest_targets: Tensor  # [N]
    rest_rows: Tensor  # [N]


def _forward(staged: TwoStageModel, batch: Sequence[Request]) -> _Forward:
    """Prefill each distinct context once, then run every continuation over a copy of its context's cache."""
    device, pad = staged.device, staged.tokenizer.pad_token_id or 0
    distinct: dict[tuple[int, ...], int] = {}
    row_context = [distinct.setdefault(tuple(context), len(distinct)) for context, _ in batch]
    rows = torch.tensor(row_context, device=device)  # [R]
    ctx_tokens, ctx_mask = left_pad(list(distinct), pad, device)  # [C, Lc]
    cont_inputs, cont_mask = left_pad([cont[:-1] for _, cont in batch], pad, device, left=False)  # [R, Lk]
    cont_mask = cont_mask.bool()
    Lc, Lk = ctx_tokens.shape[1], cont_inputs.shape[1]
    cache = staged.full.new_kv_cache(len(distinct), Lc)
    first_logits = prefill(staged.full, cache, ctx_tokens, ctx_mask)[rows]  # [R, V]
    rest_hidden = torch.empty((0, staged.decoder.args.hidden_size), device=device)
    if Lk:
        cache = cache.take_rows(rows, Lc + Lk)
        cache.valid[:, Lc:] = cont_mask
        slots = torch.arange(Lc, Lc + Lk, device=device)
        positions = positions_from_padding(cache.valid)[:, Lc:]  # [R, Lk]
        mask = causal_mask(cache.valid, slots)  # [R, 1, Lk, Lc + Lk]
        hidden = staged.decoder.hidden(cont_inputs, positions, mask, cache.select_layers(staged.layer_map),
                                       slots, kv_len=Lc + Lk)  # [R, Lk, D]
        rest_hidden = hidden[cont_mask]  # [N, D]
    rest = [list(cont[1:]) for _, cont in batch]
    return _Forward(
        first_logits=first_logits,
        first_targets=torch.tensor([cont[0] for _, cont in batch], device=device),
        rest_hidden=rest_hidden,
        rest_targets=torch.tensor([t for r in rest for t in r], dtype=torch.long, device=device),
        rest_rows=torch.repeat_interleave(torch.arange(len(batch), device=device),
                                          torch.tensor([len(r) for r in rest], device=device)),
    )


def _position_logits(staged: TwoStageModel, fwd: _Forward) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(logits `[n, V]`, targets `[n]`, rows `[n]`) for every scored position, a chunk at a time."""
    yield fwd.first_logits, fwd.first_targets, torch.arange(len(fwd.first_targets), device=fwd.first_targets.device)
    for start in range(0, len(fwd.rest_targets), LOGIT_CHUNK):
        chunk = slice(start, start + LOGIT_CHUNK)
        yield staged.decoder.lm_head(fwd.rest_hidden[chunk]), fwd.rest_targets[chunk], fwd.rest_rows[chunk]


def _batches(contexts: Sequence[Sequence[int]], extra: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches: longest contexts first, equal contexts together (they share a prefill).

    extra[i]: the tokens row i adds after its context; a batch holds at most `batch_size`
    rows and MAX_BATCH_TOKENS padded tokens.
    """
    if batch_size < 1:
        raise OverfillError(f"batch size must be positive, got {batch_size}")
    order = sorted(range(len(contexts)), key=lambda i: (-len(contexts[i]), tuple(contexts[i])))
    batch: list[int] = []
    longest = 0  # contexts come longest first, so the first row's context sets the padded length
    most_extra = 0
    for i in order:
        if batch and (len(batch) == batch_size or
                      (len(batch) + 1) * (longest + max(most_extra, extra[i])) > MAX_BATCH_TOKENS):
            yield batch
            batch = []
        if not batch:
            longest, most_extra = len(contexts[i]), 0
        batch.append(i)
        most_extra = max(most_extra, extra[i])
    if batch:
        yield batch


def _target_scores(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log P(target) `[n]` and whether the target is the argmax `[n]`."""
    logits = logits.float()
    logprob = logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)
    return logprob, logits.argmax(-1) == targets


@torch.inference_mode()
def loglikelihoods(model: TwoStageModel, mode: Mode, requests: Sequence[Request], batch_size: int = 32,
                   window: int | None = None, progress: bool = False) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) per request, as lm-evaluation-harness defines them.

    requests: (context ids, continuation ids); a context longer than `window` (default: the
    model's context window) is cut from the left as the harness does. is_greedy: every
    continuation token is the argmax given what precedes it.
    """
    staged = in_mode(model, mode)
    window = window or staged.context_window
    requests = [fit_window(context, continuation, window) for context, continuation in requests]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    contexts = [context for context, _ in requests]
    with tqdm(total=len(requests), desc=f"scoring ({mode})", unit="req", disable=not progress, leave=False) as bar:
        for batch in _batches(contexts, [len(c) for _, c in requests], batch_size):
            fwd = _forward(staged, [requests[i] for i in batch])
            logprob = torch.zeros(len(batch), dtype=torch.float64, device=staged.device)
            misses = torch.zeros(len(batch), dtype=torch.long, device=staged.device)
            for logits, targets, rows in _position_logits(staged, fwd):
                token_logprob, greedy = _target_scores(logits, targets)
                logprob.index_add_(0, rows, token_logprob.double())
                misses.index_add_(0, rows, (~greedy).long())
            for i, lp, miss in zip(batch, logprob.tolist(), misses.tolist()):
                results[i] = (lp, miss == 0)
            bar.update(len(batch))
    return results


# ---------------------------------------------------------------------------- benchmark metrics

def choice_predictions(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax of log-likelihood per character of the choice text).

    The second is lm-evaluation-harness's `acc_norm`: it divides by `len(choice)` in
    characters (of `doc_to_choice`, without the target delimiter); ties go to the first option.
    """
    if len(logprobs) != len(choices):
        raise OverfillError(f"{len(logprobs)} log-likelihoods for {len(choices)} choices")
    normalised = [lp / len(c) for lp, c in zip(logprobs, choices)]
    return _argmax(logprobs), _argmax(normalised)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and the harness's standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def task_requests(task: Task, tokenizer) -> list[tuple[list[int], list[int]]]:
    """The token-id requests of a task, option by option, document by document."""
    return [encode_pair(tokenizer, context, continuation) for doc in task.docs for context, continuation in doc.pairs]


def task_metrics(task: Task, scores: Sequence[tuple[float, bool]]) -> dict:
    """Per-task metrics from the request scores (in `task_requests` order)."""
    metrics: dict = {"kind": task.kind, "split": task.split, "source": task.source, "samples": len(task.docs),
                     "requests": len(scores)}
    if task.kind == "last_word":
        logprobs = [lp for lp, _ in scores]
        metrics["acc"], metrics["acc_stderr"] = mean_stderr([float(greedy) for _, greedy in scores])
        metrics["perplexity"] = math.exp(-sum(logprobs) / len(logprobs))
        return metrics
    acc, acc_norm, start = [], [], 0
    for doc in task.docs:
        options = scores[start:start + len(doc.pairs)]
        start += len(doc.pairs)
        pred, pred_norm = choice_predictions([lp for lp, _ in options], doc.choices)
        acc.append(float(pred == doc.gold))
        acc_norm.append(float(pred_norm == doc.gold))
    metrics["acc"], metrics["acc_stderr"] = mean_stderr(acc)
    metrics["acc_norm"], metrics["acc_norm_stderr"] = mean_stderr(acc_norm)
    return metrics


def score_task(model: TwoStageModel, mode: Mode, task: Task, batch_size: int = 32, progress: bool = False) -> dict:
    """Metrics of one benchmark task in one mode, with the time it took."""
    started, cpu_started = time.perf_counter(), time.process_time()
    requests = task_requests(task, model.tokenizer)
    scores = loglikelihoods(model, mode, requests, batch_size, progress=progress)
    metrics = task_metrics(task, scores)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["cpu_seconds"] = round(time.process_time() - cpu_started, 2)
    return metrics


# ---------------------------------------------------------------------------- chat quality

@torch.inference_mode()
def response_agreement(model: TwoStageModel, mode: Mode, requests: Sequence[Request],
                       batch_size: int = 8) -> dict:
    """Teacher-forced on the reference responses: perplexity, and agreement with the full model.

    Every response token is scored twice, by `mode` and by the full model alone, from the
    same prefix: top-1 agreement is how often their argmaxes agree, KL is KL(full || mode)
    in nats, both averaged over response tokens.
    """
    staged, reference = in_mode(model, mode), in_mode(model, "full")
    nll = kl = agree = tokens = 0.0
    contexts = [context for context, _ in requests]
    for batch in _batches(contexts, [len(c) for _, c in requests], batch_size):
        rows = [requests[i] for i in batch]
        fwd = _forward(staged, rows)
        ref = fwd if mode == "full" else _forward(reference, rows)
        for (logits, targets, _), (ref_logits, _, _) in zip(_position_logits(staged, fwd),
                                                            _position_logits(reference, ref)):
            logp, ref_logp = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)  # [n, V]
            nll -= logp.gather(-1, targets[:, None]).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
            tokens += len(targets)
    return {"tokens": int(tokens), "perplexity": math.exp(nll / tokens), "top1_agreement": agree / tokens,
            "kl_from_full": kl / tokens}


def greedy_generations(model: TwoStageModel, mode: Mode, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       batch_size: int = 8) -> list[tuple[list[int], bool]]:
    """Greedy (token ids, ended with EOS) per prompt, generated in batches as `mode` generates."""
    staged = in_mode(model, mode)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    out: list[tuple[list[int], bool]] = [([], False)] * len(prompts)
    for batch in _batches(prompts, [max_new_tokens] * len(prompts), batch_size):
        for row, _, state in stream_batch(staged, [prompts[i] for i in batch], params):
            if state.done:
                out[batch[row]] = (list(state.ids), state.finish_reason == "stop")
    return out


def matching_tokens(a: tuple[list[int], bool], b: tuple[list[int], bool]) -> int:
    """Length of the common start of two generations, the EOS counting as a token."""
    (a_ids, a_eos), (b_ids, b_eos) = a, b
    n = 0
    while n < min(len(a_ids), len(b_ids)) and a_ids[n] == b_ids[n]:
        n += 1
    return n + int(a_ids == b_ids and a_eos and b_eos)


def chat_quality(model: TwoStageModel, mode: Mode, examples: Sequence[Example], batch_size: int = 8,
                 max_new_tokens: int = 64) -> dict:
    """Chat measures on held-out examples: see `response_agreement`, and the
    mean number of greedy tokens that match the full model's greedy generation."""
    started = time.perf_counter()
    measures = response_agreement(model, mode, [(e.prompt_ids, e.response_ids) for e in examples], batch_size)
    prompts = [e.prompt_ids for e in examples]
    generated = greedy_generations(model, mode, prompts, max_new_tokens, batch_size)
    reference = generated if mode == "full" else greedy_generations(model, "full", prompts, max_new_tokens, batch_size)
    matched = [matching_tokens(g, r) for g, r in zip(generated, reference)]
    return {"examples": len(examples), **measures,
            "greedy_matching_tokens": sum(matched) / len(matched),
            "greedy_full_match": sum(m == len(r[0]) + r[1] for m, r in zip(matched, reference)) / len(matched),
            "max_new_tokens": max_new_tokens, "seconds": round(time.perf_counter() - started, 2)}


# ---------------------------------------------------------------------------- the evaluation run

@dataclass
class EvalConfig:
    """One evaluation: what to score, in which mode; recorded as the results' "settings"."""

    full: str = field(default="smollm2-135m-instruct", metadata={"help": "full model (prefill)"})
    decoder: str | None = field(default=None, metadata={
        "help": "decoder: a pruned or OverFill model directory"})
    mode: Mode | None = field(default=None, metadata={
        "help": "full: the full model alone; decoder: the decoder alone (the pruned baseline); overfill: full "
                "prefill + decoder (default: overfill with --decoder, else full)"})
    tasks: str = field(default="default", metadata={
        "help": "comma-separated benchmark tasks, 'default' (ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande, "
                "BoolQ, LAMBADA) or 'none'"})
    limit: int | None = field(default=None, metadata={"help": "score only the first N documents of each task"})
    chat_examples: int = field(default=16, metadata={
        "help": "held-out chats for the chat-quality measures (0: skip them)"})
    chat_source: str = field(default="sharegpt", metadata={"help": "chat data (see `overfill train`)"})
    chat_max_new_tokens: int = field(default=64, metadata={"help": "greedy tokens generated per chat"})
    batch_size: int = field(default=32, metadata={"help": "requests per forward pass"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, ... (auto: cuda if available)"})
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata={
        "help": "weights and activations in bf16 or fp32 (scores are summed in fp32); " + AUTO_PRECISION_HELP})


def task_names(spec: str) -> list[str]:
    if spec.strip() == "default":
        return list(DEFAULT_SUITE)
    if spec.strip() == "none":
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise OverfillError("no tasks given: name them (comma-separated), or use 'default' or 'none'")
    return names


def evaluate(cfg: EvalConfig, model: TwoStageModel | None = None) -> dict:
    """Run the benchmarks and chat measures of `cfg`; the results record (see `RESULTS_FORMAT`).

    `model`: an already loaded pair to use instead of loading `cfg.full` / `cfg.decoder`
    (their names are still what the record reports).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    mode = resolve_mode(cfg.mode, model.is_two_stage if model is not None else cfg.decoder is not None)
    if cfg.chat_examples < 0 or cfg.chat_max_new_tokens < 1:
        raise OverfillError("--chat-examples must be >= 0 and --chat-max-new-tokens >= 1")
    loaded = [load_task(name, limit=cfg.limit) for name in task_names(cfg.tasks)]  # bad names fail here
    if not loaded and not cfg.chat_examples:
        raise OverfillError("nothing to evaluate: --tasks none and --chat-examples 0")
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if model is None:
        model = TwoStageModel.from_refs(cfg.full, cfg.decoder, dtype=precision.dtype, device=device)
        print(f"precision {precision.name} ({precision.reason})", flush=True)
    load_s = time.perf_counter() - started
    results = {}
    for task in loaded:
        results[task.name] = score_task(model, mode, task, cfg.batch_size, progress=True)
        print(f"  {task.name:14s} {_summary(results[task.name])}", flush=True)
    chat = None
    if cfg.chat_examples:
        examples = load_examples(cfg.chat_source, model.tokenizer, split="validation", limit=cfg.chat_examples)
        chat = chat_quality(model, mode, examples, max(1, cfg.batch_size // 4), cfg.chat_max_new_tokens)
    accuracies = [r["acc"] for r in results.values()]
    return {
        "format": RESULTS_FORMAT,
        "mode": mode,
        "label": MODE_LABELS[mode],
        "models": _model_record(model, mode, cfg),
        "settings": {**{f.name: getattr(cfg, f.name) for f in fields(EvalConfig)}, "mode": mode,
                     "tasks": [t.name for t in loaded], "refresh_every": model.config.refresh_every,
                     "dtype": str(model.full.lm_head.weight.dtype).removeprefix("torch."),
                     "device": str(model.device)},
        "tasks": results,
        "average": {"acc": sum(accuracies) / len(accuracies), "tasks": len(accuracies)} if accuracies else None,
        "chat": chat,
        "timings": {"load_s": round(load_s, 2), "total_s": round(time.perf_counter() - started, 2),
                    "cpu_s": round(time.process_time() - cpu_started, 2), "host": _host(),
                    "note": "seconds: wall clock, on a possibly shared machine; cpu_seconds: this process's CPU "
                            "time, summed over its threads"},
    }


def _summary(metrics: dict) -> str:
    parts = [f"acc {metrics['acc']:.4f}"]
    if "acc_norm" in metrics:
        parts.append(f"acc_norm {metrics['acc_norm']:.4f}")
    if "perplexity" in metrics:
        parts.append(f"ppl {metrics['perplexity']:.2f}")
    return "  ".join(parts) + f"  ({metrics['samples']} docs, {metrics['seconds']:.1f} s)"


def _model_record(model: TwoStageModel, mode: Mode, cfg: EvalConfig) -> dict:
    from .hub import resolve

    record = {"full": cfg.full, "decoder": cfg.decoder, "layer_map": model.layer_map,
              "full_params": model.full.args.num_params(), "decoder_params": model.decoder.args.num_params()}
    for role, ref in (("full", cfg.full), ("decoder", cfg.decoder)):
        if ref is not None:
            path = resolve(ref)
            record[f"{role}_dir"], record[f"{role}_weights_sha256"] = str(path.resolve()), weights_fingerprint(path)
    decoding = model.full if mode == "full" else model.decoder
    record["decode_params"] = decoding.args.num_params()
    record["decode_bytes_bf16"] = 2 * decoding.args.num_params()
    return record


def _host() -> dict:
    from .device import cpu_model

    return {"machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
