import pytest
import torch
from torch.testing import assert_close

from conftest import ours, tiny_hf_model
from overfill.importance import (Batch, BatchAggregate, ImportanceHooks, calibration_batches, calibration_pass,
                                 reduce_tokens)
from overfill.prune import PruneConfig, choose, plan

# [3, 12] right-padded tokens: rows of 12, 9 and 5 real tokens
TOKENS = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.arange(12)[None, :] < torch.tensor([[12], [9], [5]])


def wide_model(arch: str):
    return tiny_hf_model(arch, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)


# ---------------------------------------------------------------------------- the reference, by transformers hooks

def mean_then_l2(acts: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [C]: the mean over each sequence's real tokens, then the L2 norm over sequences."""
    return torch.stack([acts[b, MASK[b]].mean(0) for b in range(len(acts))]).norm(dim=0)


def reference_importance(hf) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Minitron importance of a transformers model on TOKENS, written out plainly."""
    body, seen, handles = hf.model, {}, []

    def record(name, take):
        def hook(module, args, kwargs, out):
            seen[name] = take(args, kwargs, out)
        return hook

    norms = [n for layer in body.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)] + [body.norm]
    for i, norm in enumerate(norms):
        handles.append(norm.register_forward_hook(record(("norm", i), lambda a, k, o: o), with_kwargs=True))
    for i, layer in enumerate(body.layers):
        modules = {"mlp": layer.mlp.down_proj, "attn": layer.self_attn.o_proj}
        for name, module in modules.items():
            handles.append(module.register_forward_hook(record((name, i), lambda a, k, o: a[0]), with_kwargs=True))
        block_io = lambda a, k, o: (a[0] if a else k["hidden_states"], o[0] if isinstance(o, tuple) else o)
        handles.append(layer.register_forward_hook(record(("block", i), block_io), with_kwargs=True))
    with torch.no_grad():
        body(input_ids=TOKENS, attention_mask=MASK.long())
    for handle in handles:
        handle.remove()
    layers, head_dim = range(len(body.layers)), hf.config.head_dim
    return {
        "hidden": sum(mean_then_l2(seen[("norm", i)]) for i in range(len(norms))),
        "neurons": [mean_then_l2(seen[("mlp", i)]) for i in layers],
        "heads": [mean_then_l2(seen[("attn", i)].unflatten(-1, (-1, head_dim)).norm(dim=-1)) for i in layers],
        "blocks": torch.stack([(1 - torch.cosine_similarity(*seen[("block", i)], dim=-1))[MASK].mean()
                               for i in layers]),
    }


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_importance_and_kept_units_equal_a_transformers_reference(arch):
    hf = wide_model(arch)
    model = ours(hf)
    with ImportanceHooks(model, "mean", "l2", blocks=True) as hooks:
        calibration_pass(model, [Batch(TOKENS, MASK, scored=True)], "test", hooks)
    got, want = hooks.result(), reference_importance(hf)
    assert_close(got.hidden, want["hidden"], atol=1e-5, rtol=1e-4)
    for name in ("neurons", "heads"):
        for layer_got, layer_want in zip(getattr(got, name), want[name], strict=True):
            assert_close(layer_got, layer_want, atol=1e-5, rtol=1e-4)
    assert_close(got.blocks, want["blocks"], atol=1e-5, rtol=1e-4)

    cfg = PruneConfig(hidden=0.5, intermediate=0.5, heads=0.5, depth=2, multiple=8)
    kept = choose(got, plan(model.args, cfg), "cosine")
    layers = sorted(want["blocks"].topk(2).indices.tolist())
    assert kept.layers == layers
    assert kept.hidden.tolist() == sorted(want["hidden"].topk(32).indices.tolist())
    assert [n.tolist() for n in kept.neurons] == [sorted(want["neurons"][i].topk(48).indices.tolist()) for i in layers]
    # two of the four query heads of each KV group
    assert [h.tolist() for h in kept.heads] == [
        sorted(g * 4 + j for g in range(2) for j in want["heads"][i].view(2, 4)[g].topk(2).indices.tolist())
        for i in layers]


# ---------------------------------------------------------------------------- reductions

def test_reduce_tokens_ignores_padding():
    x = torch.randn(3, 12, 5)
    x[~MASK] = 1e6  # padding must not count
    real = [x[b, MASK[b]] for b in range(3)]
    assert_close(reduce_tokens(x, MASK, "mean"), torch.stack([r.mean(0) for r in real]))
    assert_close(reduce_tokens(x, MASK, "l2"), torch.stack([r.norm(dim=0) for r in real]))
    assert_close(reduce_tokens(x, MASK, "max"), torch.stack([r.abs().amax(0) for r in real]))


@pytest.mark.parametrize("how", ["mean", "l2", "max"])
def test_batch_aggregate_streams_like_one_reduction(how):
    scores = torch.randn(7, 4)
    stat = BatchAggregate(how)
    for part in scores.split(3):
        stat.add(part)
    whole = {"mean": scores.abs().mean(0), "l2": scores.norm(dim=0), "max": scores.abs().amax(0)}[how]
    assert_close(stat.result(), whole)


def test_calibration_batches_put_the_scored_texts_first_and_pad_on_the_right():
    def tokenize(texts, truncation, max_length):
        return {"input_ids": [[4 + ord(c) % 100 for c in t][:max_length] for t in texts]}

    texts = ["a" * 3, "b" * 9, "", "c" * 5, "d" * 2]  # the empty text is dropped, "b" * 9 is cut to 6 tokens
    batches = calibration_batches(tokenize, texts, seq_len=6, batch_size=2, scored=2)
    assert [(b.scored, b.mask.sum(1).tolist()) for b in batches] == [(True, [6, 3]), (False, [5, 2])]
    assert batches[0].mask[1].tolist() == [True] * 3 + [False] * 3 and batches[0].tokens[1, 3:].tolist() == [0] * 3
