"""Batches of training examples: which examples each step trains on, and their padded tensors.

The order (`batch_plan`, `length_groups`) depends on the data, the seed and the global batch
only, never on the mode, so the OverFill decoder and the pruned baseline see the same examples
in the same steps; `collate_split` lays a batch out as inference runs it (`losses.py`), and
`collate` as whole right-padded sequences (the first release's layout, kept as a reference).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice

from .data import Example
from .errors import OverfillError


# ---------------------------------------------------------------------------- the order

def epoch_order(n: int, seed: int) -> Iterator[int]:
    """Example indices, epoch after epoch, each epoch a new seeded permutation."""
    rng = random.Random(seed)  # Python's generator: the same order on every machine and torch version
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


def batch_plan(lengths: list[int], per_step: int, seed: int, steps: int | None = None,
               tokens: int | None = None) -> list[int]:
    """The example indices of the whole run in order, `per_step` (the global batch) per step.

    Depends on the data, the seed and the global batch only, never on the mode, so the OverFill
    decoder and the pruned baseline see the same examples in the same order. With a token budget:
    the fewest steps whose examples hold `tokens` tokens (`lengths` are prompt + response).
    """
    order = epoch_order(len(lengths), seed)
    if tokens is None:
        return list(islice(order, steps * per_step))
    plan, seen = [], 0
    while seen < tokens:
        step = list(islice(order, per_step))
        plan += step
        seen += sum(lengths[i] for i in step)
    return plan


def length_groups(plan: list[int], keys: list[tuple], per_step: int, window: int, seed: int) -> list[int]:
    """The plan with each window of `window` steps regrouped by length, the same examples per window.

    Within a window, examples are sorted by `keys` (by prompt, then response length: both parts
    of a batch are padded) and cut into steps of `per_step` (the global batch), whose order is
    then shuffled with `seed`; a step's micro-batches are consecutive runs of it. A function of
    the plan, the lengths and the global batch only, so both modes see the same batches in the
    same order, and any split of a step into processes and micro-batches trains on the same
    examples. window 0 keeps the plan as it is.
    """
    if window <= 0:
        return plan
    rng, span, grouped = random.Random(seed + 1), window * per_step, []
    for start in range(0, len(plan), span):
        chunk = sorted(plan[start:start + span], key=lambda i: keys[i])
        steps = [chunk[i:i + per_step] for i in range(0, len(chunk), per_step)]
        rng.shuffle(steps)
        grouped += [i for step in steps for i in step]
    return grouped


def plan_fingerprint(examples) -> str:
    """SHA-1 of the planned examples' ids and tokens, in order: what a resumed run must find again."""
    import hashlib
    from array import array

    digest = hashlib.sha1()
    for e in examples:
        digest.update(f"{e.uid}:{len(e.prompt_ids)}:".encode())
        digest.update(array("q", e.prompt_ids + e.response_ids).tobytes())
    return digest.hexdigest()


def length_key(example, bucket: int = 64) -> tuple[int, int]:
    """Sort key of `length_groups`: prompt length in buckets of `bucket`, then response length."""
    return len(example.prompt_ids) // bucket, len(example.response_ids)


# ---------------------------------------------------------------------------- tensors

def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-padded training batch; T is the longest prompt + response.

    For example b with prompt length P and total length L = P + R:
      tokens[b, t]          the token at t (pad_id for t >= L)                       [B, T] long
      attention_mask[b, t]  t < L                                                     [B, T] bool
      prompt_mask[b, t]     t < P: the full model prefills these positions            [B, T] bool
      targets[b, t]         tokens[b, t + 1], pad_id in the last column               [B, T] long
      loss_mask[b, t]       P - 1 <= t < L - 1: the target t + 1 is a response token  [B, T] bool
    Logits at t predict t + 1, so the first response token is predicted at t = P - 1, a prompt
    position (the full model's prefill makes the first new token, as at inference):
    loss = cross_entropy(logits[loss_mask], targets[loss_mask]).
    """
    import torch

    if not examples:
        raise OverfillError("cannot collate an empty batch")
    prompt_lens = torch.tensor([len(e.prompt_ids) for e in examples])  # [B]
    lengths = torch.tensor([len(e.prompt_ids) + len(e.response_ids) for e in examples])  # [B]
    tokens = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)  # [B, T]
    for row, e in enumerate(examples):
        tokens[row, : lengths[row]] = torch.tensor(e.prompt_ids + e.response_ids)
    positions = torch.arange(tokens.shape[1])[None, :]  # [1, T]
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    return {
        "tokens": tokens,
        "attention_mask": positions < lengths[:, None],
        "prompt_mask": positions < prompt_lens[:, None],
        "targets": targets,
        "loss_mask": (positions >= prompt_lens[:, None] - 1) & (positions < lengths[:, None] - 1),
    }


def collate_split(examples: list[Example], pad_id: int) -> dict:
    """Training batch in the inference layout: left-padded prompts, then right-padded responses.

    The prompt part is what `prefill` sees (the same layout as `BatchDecoder`'s), so slot P - 1
    holds every row's last prompt token; the response part follows from slot P. With P the longest
    prompt and R the longest response:
      prompt_tokens[b, s]    prompt token, pad_id in the left padding                   [B, P] long
      prompt_valid[b, s]     s holds a real prompt token                                [B, P] bool
      response_tokens[b, j]  response token j, pad_id after the response               [B, R] long
      response_valid[b, j]   j < the response's length                                 [B, R] bool
    Targets are the response tokens: token 0 is predicted at slot P - 1 (by the full model's prefill
    in OverFill mode), token j > 0 at slot P + j - 1 from response token j - 1, so the decoder's
    inputs are `response_tokens[:, :-1]` and the last column is never an input.
    """
    import torch

    from .engine.step import left_pad

    if not examples:
        raise OverfillError("cannot collate an empty batch")
    if any(not e.prompt_ids or not e.response_ids for e in examples):
        raise OverfillError("every training example needs a prompt and a response token")
    cpu = torch.device("cpu")
    prompt_tokens, prompt_mask = left_pad([e.prompt_ids for e in examples], pad_id, cpu)  # [B, P]
    response_tokens, response_mask = left_pad([e.response_ids for e in examples], pad_id, cpu, left=False)  # [B, R]
    return {
        "prompt_tokens": prompt_tokens,
        "prompt_valid": prompt_mask.bool(),
        "response_tokens": response_tokens,
        "response_valid": response_mask.bool(),
    }


def padding_fraction(batch: dict) -> float:
    """Padded slots / all slots of a `collate_split` batch."""
    valid = int(batch["prompt_valid"].sum() + batch["response_valid"].sum())
    total = batch["prompt_valid"].numel() + batch["response_valid"].numel()
    return 1 - valid / total
