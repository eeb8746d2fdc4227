"""The fast training losses against the first release's path (`reference_losses`), in fp32.

Equal per-example losses and equal decoder gradients, on tiny random pairs with mixed prompt
and response lengths, with identity and non-identity layer maps, with and without KD.
"""
import pytest
import torch
from torch.testing import assert_close

from overfill.batching import collate, collate_split
from overfill.data import Example
from overfill.losses import reference_losses, response_losses, token_losses
from overfill.model import ModelArgs, Transformer


def tiny_args(hidden=64, intermediate=96, layers=2, vocab=128, tie=False, model_type="llama"):
    return ModelArgs(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rms_norm_eps=1e-5, tie_word_embeddings=tie, qkv_bias=model_type == "qwen2",
                     qk_norm=model_type == "qwen3")


def random_model(args, seed):
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    return model


def examples(seed=0, n=5, vocab=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        out.append(Example(ids[:p], ids[p:], f"ex{i}"))
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run(loss_fn, full, decoder, batch, mode, layer_map, kd):
    decoder.zero_grad()
    ce, kl = loss_fn(full, decoder, batch, mode, layer_map, kd=kd)
    (ce.sum() + 0.7 * kl.sum()).backward()
    return ce.detach(), kl.detach(), grads(decoder)


@pytest.mark.parametrize("mode", ["overfill", "pruned"])
@pytest.mark.parametrize("kd", [False, True])
@pytest.mark.parametrize("depth_pruned", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_fast_losses_and_gradients_equal_the_first_release_path(mode, kd, depth_pruned, model_type):
    full = random_model(tiny_args(layers=3, model_type=model_type), seed=0).requires_grad_(False)
    layer_map = [0, 2] if depth_pruned else None
    decoder = random_model(tiny_args(hidden=32, intermediate=48, layers=2 if depth_pruned else 3, tie=True,
                                     model_type=model_type), seed=1)
    batch = examples(seed=3)
    ce, kl, g = run(response_losses, full, decoder, collate_split(batch, pad_id=0), mode, layer_map, kd)
    ref_ce, ref_kl, ref_g = run(reference_losses, full, decoder, collate(batch, pad_id=0), mode, layer_map, kd)
    assert_close(ce, ref_ce, atol=1e-5, rtol=1e-5)
    assert_close(kl, ref_kl, atol=1e-5, rtol=1e-5)
    assert (kl > 0).all() == kd
    assert g.keys() == ref_g.keys() and len(g) > 0
    for name in g:
        assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-5, msg=name)


def test_overfill_loss_does_not_depend_on_the_decoder_at_the_first_response_token():
    """A 1-token response is predicted by the full model alone: no decoder gradient at all."""
    full = random_model(tiny_args(), seed=0).requires_grad_(False)
    decoder = random_model(tiny_args(hidden=32, intermediate=48), seed=1)
    batch = collate_split([Example([5, 6, 7], [9], "a"), Example([8], [10], "b")], pad_id=0)
    ce, _ = response_losses(full, decoder, batch, "overfill")
    assert not ce.requires_grad and (ce > 0).all()


def test_token_losses_match_torch_distributions_in_chunks():
    torch.manual_seed(0)
    student_head, teacher_head = torch.nn.Linear(8, 50, bias=False), torch.nn.Linear(6, 50, bias=False)
    student, teacher, targets = torch.randn(7, 8), torch.randn(7, 6), torch.randint(0, 50, (7,))
    s, t = student_head(student), teacher_head(teacher)
    ce, kl = token_losses(s, targets, teacher, teacher_head, chunk=3)
    expected = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=t),
                                                 torch.distributions.Categorical(logits=s))
    assert_close(kl, expected.detach(), atol=1e-5, rtol=1e-5)
    assert_close(ce, torch.nn.functional.cross_entropy(s, targets, reduction="none").detach())


def test_right_aligned_puts_each_row_from_slot_0():
    from overfill.losses import right_aligned

    batch = collate_split([Example([5, 6, 7], [9, 10], "a"), Example([8], [11, 12, 13], "b")], pad_id=0)
    tokens, valid, at = right_aligned(batch)
    assert tokens.tolist() == [[5, 6, 7, 9], [8, 11, 12, 0]]
    assert valid.tolist() == [[True] * 4, [True, True, True, False]]
    assert at.tolist() == [[False, False, True, True], [True, True, True, False]]
