"""Activation-based (Minitron) importance of a Transformer's prunable units, from calibration text.

Forward hooks on our own `Transformer` accumulate, in one pass over the calibration batches:
- hidden channel: the outputs of every normalisation layer (both per block, and the final one);
- MLP neuron: the input of the down projection, per layer;
- query head: the L2 norm of the head's attention output (the input of o_proj), per layer;
- layer: 1 - cosine(block input, block output), averaged over tokens;
- the residual stream's second moments where every norm reads it (for `--method rotate`): per
  norm, the sum over tokens of x x^T of its input x normalised to rms 1 (what the norm's readers see).
Per-token scores are reduced over each sequence (`seq_aggregate`) and then over the batch
(`batch_aggregate`); Minitron found mean-then-L2 best, which is the default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .errors import OverfillError
from .model import Transformer, causal_mask

Aggregate = Literal["mean", "l2", "max"]


# ---------------------------------------------------------------------------- calibration batches

@dataclass
class Batch:
    """Right-padded calibration sequences of similar length."""

    tokens: Tensor
    """[B, T] token ids."""
    mask: Tensor
    """[B, T] bool, False on padding."""
    scored: bool
    """Whether the calibration loss (before and after pruning) is measured on it."""


def calibration_texts(source: str, samples: int, seed: int, tokenizer, given: list[str] | None = None) -> list[str]:
    """Up to `samples` non-empty texts: `given`, else picked from the data source `source`."""
    if given is None:
        from .data import calibration_texts as pick

        given = pick(source, samples, seed=seed, tokenizer=tokenizer)
    texts = [t for t in given[:samples] if t.strip()]
    if not texts:
        raise OverfillError(f"calibration data '{source}' has no text: give a source with "
                            f"non-empty texts (--calibration sharegpt or a .txt/.jsonl file)")
    return texts


def calibration_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int, scored: int) -> list[Batch]:
    """Token batches of the texts cut to `seq_len` tokens; the first `scored` texts are scored."""
    ids = [row for row in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"] if row]
    if not ids:
        raise OverfillError("the calibration texts are all empty: give a data source with text in it")
    if max(len(row) for row in ids[:scored]) < 2:
        raise OverfillError("the calibration texts are single tokens: give longer texts")
    return _batches(ids[:scored], batch_size, True) + _batches(ids[scored:], batch_size, False)


def _batches(ids: list[list[int]], batch_size: int, scored: bool) -> list[Batch]:
    ids = sorted(ids, key=len, reverse=True)  # similar lengths together: little padding
    batches = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        tokens = torch.zeros(len(rows), len(rows[0]), dtype=torch.long)
        mask = torch.zeros(len(rows), len(rows[0]), dtype=torch.bool)
        for b, row in enumerate(rows):
            tokens[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = True
        batches.append(Batch(tokens, mask, scored))
    return batches


# ---------------------------------------------------------------------------- reductions

@dataclass
class Importance:
    """Activation-based importance of every prunable unit of the full model."""

    hidden: Tensor
    """[D], summed over all normalisation layers."""
    neurons: list[Tensor]
    """Per layer: [F]."""
    heads: list[Tensor]
    """Per layer: [H]."""
    blocks: Tensor | None
    """[L]: 1 - cosine(block input, block output); None when not measured."""
    covariance: Tensor | None = None
    """[2L + 1, D, D] float64, per norm (per layer input and post-attention, then the final one): the
    sum over tokens of x x^T, x its input scaled to rms 1; None when not measured."""


def reduce_tokens(x: Tensor, mask: Tensor, how: Aggregate) -> Tensor:
    """[B, T, C] activations -> [B, C] float32, over the real tokens (mask [B, T] bool) only."""
    if how == "mean":  # as a matrix product: an elementwise pass in float32 would cost a third of the forward
        sums = torch.bmm(mask[:, None, :].to(x.dtype), x)[:, 0].float()  # [B, C]
        return sums / mask.sum(1, keepdim=True)
    x = x * mask[..., None].to(x.dtype)  # zero the padding (exact in any dtype)
    if how == "l2":
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    return x.abs().amax(1).float()


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """[B, T, D] x 2 -> [B, T] cosine similarity, accumulated in float32."""
    dot = (a * b).sum(-1, dtype=torch.float32)
    norms = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32) * torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32)
    return dot / norms.clamp_min(1e-12)


class BatchAggregate:
    """Streams per-sequence scores [B, C] into one score per channel [C]."""

    def __init__(self, how: Aggregate):
        self.how, self.total, self.count = how, None, 0

    def add(self, per_sequence: Tensor) -> None:
        v = per_sequence.abs()
        part = v.amax(0) if self.how == "max" else (v.square() if self.how == "l2" else v).sum(0)
        if self.total is None:
            self.total = part
        else:
            self.total = torch.maximum(self.total, part) if self.how == "max" else self.total + part
        self.count += v.shape[0]

    def result(self) -> Tensor:
        if self.how == "l2":
            return self.total.sqrt()
        return self.total / self.count if self.how == "mean" else self.total


# ---------------------------------------------------------------------------- hooks

class ImportanceHooks:
    """Forward hooks on a Transformer that accumulate Minitron importance during calibration.

    Block importance (a cosine per token and layer) is measured only when `blocks` is set:
    only depth pruning by cosine needs it; the residual covariance only when `covariance` is set.
    """

    def __init__(self, model: Transformer, seq_aggregate: Aggregate = "mean", batch_aggregate: Aggregate = "l2",
                 blocks: bool = False, covariance: bool = False):
        self.model, self.seq_aggregate, self.blocks, self.covariance = model, seq_aggregate, blocks, covariance
        self.mask: Tensor | None = None  # [B, T] bool of the batch being run
        n = len(model.model.layers)
        self.norms = [BatchAggregate(batch_aggregate) for _ in range(2 * n + 1)]
        self.neurons = [BatchAggregate(batch_aggregate) for _ in range(n)]
        self.heads = [BatchAggregate(batch_aggregate) for _ in range(n)]
        self.block_distance = torch.zeros(n, dtype=torch.float64)
        self.tokens = 0
        self.second_moments: Tensor | None = None  # [2L + 1, D, D] float32 on the model's device, once it runs
        self.handles = []

    def __enter__(self) -> "ImportanceHooks":
        layers = self.model.model.layers
        norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        for module, stat in zip(norms + [self.model.model.norm], self.norms):
            self.handles.append(module.register_forward_hook(self._channels(stat, output=True)))
        if self.covariance:
            for i, module in enumerate(norms + [self.model.model.norm]):
                self.handles.append(module.register_forward_pre_hook(self._second_moment(i)))
        for i, layer in enumerate(layers):
            self.handles.append(layer.mlp.down_proj.register_forward_hook(self._channels(self.neurons[i], output=False)))
            self.handles.append(layer.self_attn.o_proj.register_forward_hook(self._heads(self.heads[i])))
            if self.blocks:
                self.handles.append(layer.register_forward_hook(self._block(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _channels(self, stat: BatchAggregate, output: bool):
        def hook(module, inputs, out):
            x = out if output else inputs[0]  # [B, T, C]
            stat.add(reduce_tokens(x, self.mask, self.seq_aggregate))
        return hook

    def _heads(self, stat: BatchAggregate):
        head_dim = self.model.args.head_dim

        def hook(module, inputs, out):
            x = inputs[0]  # [B, T, H * head_dim]
            per_head = torch.linalg.vector_norm(x.unflatten(-1, (-1, head_dim)), dim=-1, dtype=torch.float32)  # [B, T, H]
            stat.add(reduce_tokens(per_head, self.mask, self.seq_aggregate))
        return hook

    def _second_moment(self, i: int):
        def hook(module, inputs):
            x = inputs[0][self.mask].float()  # [N, D], the real tokens
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps)
            if self.second_moments is None:  # float32 where the model runs (a few batches' sums); no copy per call
                n, d = len(self.norms), x.shape[1]
                self.second_moments = torch.zeros(n, d, d, dtype=torch.float32, device=x.device)
            self.second_moments[i].addmm_(x.T, x)
        return hook

    def _block(self, i: int):
        def hook(module, inputs, out):
            x_in = inputs[0]  # [B, T, D]; out: [B, T, D]
            self.block_distance[i] += (1 - cosine(x_in, out))[self.mask].sum().item()
            if i == 0:
                self.tokens += int(self.mask.sum().item())
        return hook

    def result(self) -> Importance:
        return Importance(hidden=torch.stack([s.result() for s in self.norms]).sum(0),
                          neurons=[s.result() for s in self.neurons],
                          heads=[s.result() for s in self.heads],
                          blocks=(self.block_distance / self.tokens).float() if self.blocks else None,
                          covariance=None if self.second_moments is None else self.second_moments.double().cpu())


# ---------------------------------------------------------------------------- the pass

def final_hidden(model: Transformer, tokens: Tensor, mask: Tensor) -> Tensor:
    """Final-norm hidden states [B, T, D] of right-padded tokens [B, T] (mask [B, T] bool)."""
    slots = torch.arange(tokens.shape[1], device=tokens.device)  # right padding: a real token's position is its slot
    return model.hidden(tokens, slots.expand_as(tokens), causal_mask(mask, slots))


def calibration_pass(model: Transformer, batches: list[Batch], desc: str,
                     hooks: ImportanceHooks | None = None) -> float:
    """Run the batches (and the hooks, if any); the mean next-token loss over the scored ones."""
    device = model.model.embed_tokens.weight.device
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch"):
            tokens, mask = batch.tokens.to(device), batch.mask.to(device)
            if hooks is not None:
                hooks.mask = mask
            hidden = final_hidden(model, tokens, mask)  # [B, T, D]
            if not batch.scored:
                continue
            for b in range(tokens.shape[0]):  # one row at a time: [T, vocab] logits, not [B, T, vocab]
                real = mask[b, 1:]
                logits = model.lm_head(hidden[b, :-1][real]).float()  # [N, V]
                nll += nn.functional.cross_entropy(logits, tokens[b, 1:][real], reduction="sum").item()
                count += int(real.sum())
    return nll / count


def calibration_summary(source: str, batches: list[Batch], loss_before: float, loss_after: float) -> dict:
    scored = [b for b in batches if b.scored]
    return {"source": source,
            "sequences": sum(len(b.tokens) for b in batches), "tokens": sum(int(b.mask.sum()) for b in batches),
            "loss_sequences": sum(len(b.tokens) for b in scored), "loss_tokens": sum(int(b.mask.sum()) for b in scored),
            "loss_before": loss_before, "loss_after": loss_after,
            "perplexity_before": math.exp(loss_before), "perplexity_after": math.exp(loss_after)}
