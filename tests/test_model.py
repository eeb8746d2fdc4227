import pytest
import torch
from torch.testing import assert_close

from overfill.errors import OverfillError
from overfill.model import (ModelArgs, causal_mask, from_state_dict, load_model, positions_from_padding,
                            save_model)
from conftest import ours, tiny_hf_model

ARCHS = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("mistral", {}),
    ("qwen2", {}),
    ("qwen3", {}),
]


def full_mask(attention_mask):
    T = attention_mask.shape[1]
    return causal_mask(attention_mask.bool(), torch.arange(T))


@pytest.mark.parametrize("arch,overrides", ARCHS)
def test_logits_match_transformers(arch, overrides):
    hf = tiny_hf_model(arch, **overrides)
    model = ours(hf)
    tokens = torch.randint(3, 128, (2, 11))
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, :4] = 0  # left padding
    ref = hf(input_ids=tokens, attention_mask=attention_mask,
             position_ids=positions_from_padding(attention_mask)).logits
    got = model(tokens, positions_from_padding(attention_mask), full_mask(attention_mask))
    real = attention_mask.bool()
    assert_close(got[real], ref[real], atol=1e-5, rtol=1e-4)


def test_cached_prefill_and_decode_equal_full_forward():
    model = ours(tiny_hf_model("qwen3"))
    tokens = torch.randint(3, 128, (2, 9))
    attention_mask = torch.ones_like(tokens)
    attention_mask[0, :3] = 0
    positions = positions_from_padding(attention_mask)
    reference = model(tokens, positions, full_mask(attention_mask))
    cache = model.new_kv_cache(2, 16)
    cache.valid[:, :9] = attention_mask.bool()
    logits = model(tokens[:, :6], positions[:, :6], causal_mask(cache.valid[:, :6], torch.arange(6)),
                   cache, torch.arange(6), kv_len=6)
    steps = [logits]
    for t in range(6, 9):
        slot = torch.tensor([t])
        steps.append(model(tokens[:, t:t + 1], positions[:, t:t + 1], causal_mask(cache.valid[:, :t + 1], slot),
                           cache, slot, kv_len=t + 1))
    assert_close(torch.cat(steps, 1)[attention_mask.bool()], reference[attention_mask.bool()], atol=1e-5, rtol=1e-4)


def test_num_params_matches_module():
    for arch, overrides in ARCHS:
        model = ours(tiny_hf_model(arch, **overrides))
        distinct = sum(p.numel() for p in model.parameters())
        assert model.args.num_params() == distinct, arch


def test_save_model_roundtrip_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    hf = tiny_hf_model("llama", tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    save_model(model, tmp_path / "out", config_from=tmp_path / "src")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_close(reloaded.model.norm.weight, model.model.norm.weight)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch,overrides", ARCHS)
def test_fused_projections_equal_separate_ones(arch, overrides):
    model = ours(tiny_hf_model(arch, **overrides))
    tokens = torch.randint(3, 128, (2, 7))
    attention_mask = torch.ones_like(tokens)
    positions, mask = positions_from_padding(attention_mask), full_mask(attention_mask)
    with torch.no_grad():
        reference = model(tokens, positions, mask)
    params, names = {n: id(p) for n, p in model.named_parameters()}, list(model.state_dict())
    model.fuse_projections().fuse_projections()  # idempotent
    attn = model.model.layers[0].self_attn
    assert attn.is_fused and attn.fused_weight.shape[0] == sum(attn.fused_sizes)
    assert attn.k_proj.weight.data_ptr() == attn.fused_weight[attn.fused_sizes[0]:].data_ptr()
    assert {n: id(p) for n, p in model.named_parameters()} == params and list(model.state_dict()) == names
    with torch.no_grad():
        assert_close(model(tokens, positions, mask), reference, atol=1e-5, rtol=1e-4)


def test_fused_projections_follow_updates_moves_and_saving(tmp_path):
    hf = tiny_hf_model("qwen2")  # q/k/v biases
    hf.save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src").fuse_projections()
    tokens = torch.randint(3, 128, (1, 5))
    positions, mask = positions_from_padding(torch.ones_like(tokens)), full_mask(torch.ones_like(tokens))
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        attn.v_proj.bias.add_(0.5)  # an in-place update (as an optimizer makes) reaches the fused product
        assert_close(attn.fused_bias[-attn.fused_sizes[-1]:], attn.v_proj.bias)
    # With autograd on, the separate projections run, so their parameters get gradients.
    model(tokens, positions, mask).sum().backward()
    assert attn.q_proj.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    model.to(torch.bfloat16)
    assert attn.fused_weight.dtype == torch.bfloat16
    assert attn.q_proj.weight.data_ptr() == attn.fused_weight.data_ptr()
    save_model(model, tmp_path / "out", config_from=tmp_path / "src")  # views of one buffer save apart
    reloaded = load_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(model(tokens, positions, mask), reloaded(tokens, positions, mask))


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(OverfillError, match="unsupported architecture 'gpt2'"):
        ModelArgs.from_hf({"model_type": "gpt2"})


def test_missing_weights_is_a_clear_error(tmp_path):
    hf = tiny_hf_model("llama")
    state = hf.state_dict()
    state.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(OverfillError, match="lack 1 tensors"):
        from_state_dict(ModelArgs.from_hf(hf.config), state)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model = load_model(smollm2_dir)
    assert model.args.head_dim == 64 and model.args.num_key_value_heads == 3
    tokens = torch.randint(0, 49152, (1, 24))
    mask = torch.ones_like(tokens)
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = model(tokens, positions_from_padding(mask), full_mask(mask))
    assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_bf16_training_attention_equals_sdpa_forward_and_backward():
    """The plain bf16 formulation used in CPU training against SDPA in fp32, on a padded causal mask."""
    import torch.nn.functional as F

    from overfill.model import attention, causal_mask

    torch.manual_seed(0)
    B, H, H_kv, T, P, D = 3, 4, 2, 5, 4, 16
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = (torch.randn(B, H_kv, P + T, D, requires_grad=True) for _ in range(2))
    valid = torch.ones(B, P + T, dtype=torch.bool)
    valid[1, :2] = False  # left padding of a prompt
    valid[2, -1] = False  # right padding of a response
    mask = causal_mask(valid, torch.arange(P, P + T))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    fast = attention(*(x.detach().bfloat16().requires_grad_() for x in (q, k, v)), mask)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference, atol=3e-2, rtol=3e-2)
    grads = torch.autograd.grad(reference.sum(), (q, k, v))
    inputs = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    fast_grads = torch.autograd.grad(attention(*inputs, mask).float().sum(), inputs)
    for g, f in zip(grads, fast_grads):
        torch.testing.assert_close(f.float(), g, atol=6e-2, rtol=6e-2)
    with torch.no_grad():  # inference keeps SDPA
        torch.testing.assert_close(attention(q, k, v, mask), reference.detach())


# ---------------------------------------------------------------------------- positions and masks

def test_positions_count_the_real_tokens_before_each_slot():
    mask = torch.tensor([[0, 0, 1, 1, 1],   # left padding (a prompt batch)
                         [1, 1, 1, 1, 1],   # no padding
                         [1, 1, 1, 0, 0],   # right padding (a response batch): pads repeat the last position
                         [0, 0, 0, 0, 0]])  # all padding
    expected = torch.tensor([[0, 0, 0, 1, 2],
                             [0, 1, 2, 3, 4],
                             [0, 1, 2, 2, 2],
                             [0, 0, 0, 0, 0]])
    assert torch.equal(positions_from_padding(mask), expected)
    assert torch.equal(positions_from_padding(mask.bool()), expected)
    assert positions_from_padding(mask).dtype == torch.long


def test_positions_of_a_left_padded_row_are_those_it_has_alone():
    alone = positions_from_padding(torch.ones(1, 3, dtype=torch.long))
    padded = positions_from_padding(torch.tensor([[0, 0, 0, 0, 1, 1, 1]]))
    assert torch.equal(padded[:, 4:], alone)


def test_positions_equal_transformers_generation_position_ids_on_real_tokens():
    hf = tiny_hf_model("llama")
    prepare = getattr(hf, "_prepare_position_ids_for_generation", None)
    if prepare is None:
        pytest.skip("this transformers has no _prepare_position_ids_for_generation")
    torch.manual_seed(0)
    mask = (torch.rand(6, 9) > 0.3).long()
    mask[:3, :4] = 0  # some rows left-padded, the rest with holes anywhere
    tokens = torch.randint(3, 128, mask.shape)
    reference = prepare(tokens, {"attention_mask": mask})
    got = positions_from_padding(mask)
    real = mask.bool()
    assert torch.equal(got[real], reference[real])
    assert torch.equal(got[:3, :4], reference[:3, :4])  # both give left padding position 0


def test_prefill_mask_with_left_padding_is_causal_over_real_keys():
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    mask = causal_mask(valid, torch.arange(4))
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0],   # a padding query sees only itself
                                         [0, 1, 0, 0],
                                         [0, 1, 1, 0],
                                         [0, 1, 1, 1]]
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_single_slot_decode_mask_sees_valid_keys_up_to_its_slot():
    valid = torch.tensor([[False, False, True, True, True, True],
                          [True, True, True, True, True, True]])
    last = causal_mask(valid, torch.tensor([5]))
    assert last.shape == (2, 1, 1, 6)
    assert last[:, 0, 0].int().tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    # a static cache holds more slots than are filled: the ones after the query's slot stay hidden
    middle = causal_mask(valid, torch.tensor([3]))
    assert middle[:, 0, 0].int().tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]


def test_mask_with_a_prefix_of_invalid_slots():
    """Rows moved right in the cache (their first slots free) and queries for several new slots at once."""
    valid = torch.tensor([[False, False, False, True, True, True, True]])
    mask = causal_mask(valid, torch.tensor([5, 6]))
    assert mask[0, 0].int().tolist() == [[0, 0, 0, 1, 1, 1, 0],
                                         [0, 0, 0, 1, 1, 1, 1]]


def test_a_row_of_padding_only_gives_finite_attention():
    valid = torch.zeros(1, 4, dtype=torch.bool)
    mask = causal_mask(valid, torch.arange(4))
    assert torch.equal(mask[0, 0], torch.eye(4, dtype=torch.bool))  # each query sees itself, nothing else
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and torch.allclose(out, v)


def test_causal_mask_is_transformers_sdpa_mask_plus_each_query_seeing_itself():
    import inspect

    from transformers.masking_utils import sdpa_mask

    if "q_offset" not in inspect.signature(sdpa_mask).parameters:
        pytest.skip("this transformers' sdpa_mask takes other arguments")
    torch.manual_seed(0)
    valid = torch.rand(5, 10) > 0.25
    valid[:2, :3] = False  # left padding
    for first, T in ((0, 10), (9, 1), (6, 4)):  # a prefill, a decode step, a chunk
        slots = torch.arange(first, first + T)
        reference = sdpa_mask(batch_size=5, q_length=T, kv_length=10, q_offset=first, attention_mask=valid,
                              allow_is_causal_skip=False)
        own = slots[:, None] == torch.arange(10)[None, :]  # [T, S]
        assert torch.equal(causal_mask(valid, slots), reference | own), (first, T)


def test_weights_may_be_links_into_the_hub_caches_blobs(tmp_path):
    # huggingface_hub keeps a snapshot's files as links to the repository's blobs, beside the snapshots
    import shutil

    from conftest import save_tiny
    from overfill.model import load_model, weight_files

    source = save_tiny(tmp_path / "source", seed=0)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(source, snapshot)
    (repo / "blobs").mkdir()
    (snapshot / "model.safetensors").rename(repo / "blobs" / "f00d")
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    assert weight_files(snapshot) == [snapshot / "model.safetensors"]
    assert load_model(snapshot).args.num_hidden_layers == 2
