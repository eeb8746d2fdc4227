"""Training losses over the response tokens: the OverFill objective and the pruned baseline's.

Both take a `batching.collate_split` batch (left-padded prompts in slots 0..P-1, right-padded
responses after) and return per-example sums over the response tokens, cross-entropy `[B]`
and KL(full || decoder) `[B]`, in fp32.

`overfill_losses` computes what inference computes and nothing else: the frozen full model
prefills the prompts into a KV cache and yields logits at the last prompt slot only (they
predict the first response token, with no gradient); the decoder runs over the response
tokens only, reading the full model's prompt keys and values and its own; the LM heads run
at the targets only, a chunk at a time. `reference_losses` is the first release's path
(`two_stage.split_logits` over whole right-padded sequences): slower, equal in fp32, and kept
as the numerical reference of the tests and the training benchmark.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import Transformer, causal_mask, positions_from_padding

LM_HEAD_CHUNK = 2048  # target tokens whose vocabulary-sized logits `[chunk, V]` exist at once


def token_losses(student_logits: Tensor, targets: Tensor, teacher_hidden: Tensor | None = None,
                 teacher_head: torch.nn.Module | None = None, chunk: int = LM_HEAD_CHUNK) -> tuple[Tensor, Tensor]:
    """Cross-entropy `[N]` and KL(teacher || student) `[N]` (zeros without a teacher), in fp32.

    student_logits `[N, V]` (any dtype), targets `[N]`; teacher_hidden `[N, D_t]`, no gradient,
    whose logits are made `chunk` rows at a time. Everything is upcast to fp32 before the softmax.
    """
    ce_parts, kl_parts = [], []
    for start in range(0, student_logits.shape[0], chunk):
        rows = slice(start, start + chunk)
        logits = student_logits[rows].float()  # [n, V]
        ce_parts.append(F.cross_entropy(logits, targets[rows], reduction="none"))
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher = teacher_head(teacher_hidden[rows]).float().log_softmax(-1)  # [n, V]
            kl_parts.append(F.kl_div(logits.log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1))
    empty = student_logits.new_zeros(0, dtype=torch.float32)
    ce = torch.cat(ce_parts) if ce_parts else empty
    kl = torch.cat(kl_parts) if kl_parts else torch.zeros_like(ce)
    return ce, kl


def _per_example(values: Tensor, rows: Tensor, batch: int) -> Tensor:
    """Sum `values` `[N]` into their examples `rows` `[N]` -> `[batch]`."""
    return values.new_zeros(batch).index_add(0, rows, values)


def _sequence(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The decoder-input sequence: prompt then response inputs, and its validity. `[B, P + R - 1]`."""
    tokens = torch.cat((batch["prompt_tokens"], batch["response_tokens"][:, :-1]), dim=1)
    valid = torch.cat((batch["prompt_valid"], batch["response_valid"][:, :-1]), dim=1)
    return tokens, valid


def overfill_losses(full: Transformer, decoder: Transformer, batch: dict[str, Tensor],
                    layer_map: list[int] | None = None, kd: bool = False) -> tuple[Tensor, Tensor]:
    """The two-stage objective (see the module docstring); gradients reach the decoder only."""
    prompt, response, response_valid = batch["prompt_tokens"], batch["response_tokens"], batch["response_valid"]
    (B, P), R = prompt.shape, response.shape[1]
    tokens, valid = _sequence(batch)  # [B, P + R - 1]
    positions = positions_from_padding(valid)  # [B, P + R - 1]
    # The teacher for KD needs the full model over the response inputs too; otherwise the prompt is enough.
    T_full = P + R - 1 if kd else P
    with torch.no_grad():
        full_cache = full.new_kv_cache(B, T_full)
        slots = torch.arange(T_full, device=prompt.device)
        full_hidden = full.hidden(tokens[:, :T_full], positions[:, :T_full], causal_mask(valid[:, :T_full], slots),
                                  full_cache, slots)  # [B, T_full, D_full]
        first = full.lm_head(full_hidden[:, P - 1]).float()  # [B, V]: the first response token
        first_ce = F.cross_entropy(first, response[:, 0], reduction="none")  # [B]
    prefix = full_cache.first_slots(P).select_layers(layer_map)
    query_slots = torch.arange(P, P + R - 1, device=prompt.device)
    at = response_valid[:, 1:]  # [B, R - 1]: the input at j predicts response token j + 1
    logits = decoder(response[:, :-1], positions[:, P:], causal_mask(valid, query_slots), prefix_kv=prefix,
                     select=at)  # [N, V]
    teacher = full_hidden[:, P:][at] if kd else None
    ce, kl = token_losses(logits, response[:, 1:][at], teacher, full.lm_head)
    rows = at.nonzero()[:, 0]
    return first_ce + _per_example(ce, rows, B), _per_example(kl, rows, B)  # KL is 0 at the full model's token


def right_aligned(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's prompt and response inputs side by side from slot 0: tokens and validity `[B, T]`,
    and the positions `[B, T]` whose next token is a response token (row-major in response order).

    T = the longest prompt + response - 1, not P + R - 1: the baseline reads no cache, so it
    need not keep the prompts left-padded, and right padding is the least of it.
    """
    prompt_lens = batch["prompt_valid"].sum(1)  # [B]
    total = prompt_lens + batch["response_valid"].sum(1)  # [B]
    tokens, _ = _sequence(batch)  # [B, P + R - 1], left-padded prompts
    P, T = batch["prompt_tokens"].shape[1], int(total.max()) - 1
    t = torch.arange(T, device=tokens.device)[None, :]  # [1, T]
    source = (t + (P - prompt_lens)[:, None]).clamp(max=tokens.shape[1] - 1)  # skip each row's left padding
    valid = t < total[:, None] - 1
    at = (t >= prompt_lens[:, None] - 1) & valid
    return tokens.gather(1, source).masked_fill(~valid, 0), valid, at


def pruned_losses(decoder: Transformer, batch: dict[str, Tensor], full: Transformer | None = None,
                  kd: bool = False) -> tuple[Tensor, Tensor]:
    """The baseline: the decoder alone over prompt + response; the LM head at the response targets only."""
    response, response_valid = batch["response_tokens"], batch["response_valid"]
    tokens, valid, at = right_aligned(batch)  # [B, T]
    positions = positions_from_padding(valid)
    mask = causal_mask(valid, torch.arange(tokens.shape[1], device=tokens.device))  # [B, 1, T, T]
    logits = decoder(tokens, positions, mask, select=at)  # [N, V]
    teacher = None
    if kd:
        with torch.no_grad():
            teacher = full.hidden(tokens, positions, mask)[at]  # [N, D_full]
    ce, kl = token_losses(logits, response[response_valid], teacher, full.lm_head if kd else None)
    rows = response_valid.nonzero()[:, 0]
    B = response.shape[0]
    return _per_example(ce, rows, B), _per_example(kl, rows, B)


def response_losses(full: Transformer | None, decoder: Transformer, batch: dict[str, Tensor], mode: str,
                    layer_map: list[int] | None = None, kd: bool = False) -> tuple[Tensor, Tensor]:
    if mode == "overfill":
        return overfill_losses(full, decoder, batch, layer_map, kd)
    return pruned_losses(decoder, batch, full, kd)


def reference_losses(full: Transformer | None, decoder: Transformer, batch: dict[str, Tensor], mode: str,
                     layer_map: list[int] | None = None, kd: bool = False) -> tuple[Tensor, Tensor]:
    """The first release's path over a `batching.collate` batch (whole right-padded sequences)."""
    from .two_stage import split_logits

    tokens, attention_mask, loss_mask = batch["tokens"], batch["attention_mask"], batch["loss_mask"]
    if mode == "overfill":
        logits, full_hidden = split_logits(full, decoder, tokens, attention_mask, batch["prompt_mask"], layer_map)
    else:
        positions = positions_from_padding(attention_mask)  # [B, T]
        mask = causal_mask(attention_mask, torch.arange(tokens.shape[1], device=tokens.device))  # [B, 1, T, T]
        logits = decoder(tokens, positions, mask)  # [B, T, V]
        full_hidden = None
        if kd:
            with torch.no_grad():
                full_hidden = full.hidden(tokens, positions, mask)  # [B, T, D_full]
    student = logits[loss_mask].float()  # [N, V]
    ce = F.cross_entropy(student, batch["targets"][loss_mask], reduction="none")  # [N]
    kl = torch.zeros_like(ce)
    if kd:
        teacher = full.lm_head(full_hidden[loss_mask]).float().log_softmax(-1)
        kl = F.kl_div(student.log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1)
    rows = loss_mask.nonzero()[:, 0]
    return _per_example(ce, rows, tokens.shape[0]), _per_example(kl, rows, tokens.shape[0])
