"""The bf16 kernels (engine/one_row.py): the one-row product, the layer stack, and the model's routing to them."""
import os

import pytest
import torch
import torch.nn.functional as F

import overfill.model as model_module
from overfill.engine import BatchDecoder, SamplingParams, one_row
from overfill.errors import OverfillError
from overfill.kv_cache import KVCache
from overfill.model import causal_mask, decodes_with_layer_stack, linear, use_decode_layers, use_one_row_kernel
from overfill.two_stage import TwoStageModel
from conftest import ours, tiny_hf_model

@pytest.fixture
def kernel():
    """Built on first use by a test, never at collection (collecting the suite builds nothing)."""
    if not one_row.load():
        pytest.skip("the CPU lacks AVX512-BF16 (or no compiler)")


needs_kernel = pytest.mark.usefixtures("kernel")


@pytest.fixture
def no_kernel():
    """Each test starts and ends with the steps layer by layer on F.linear, whatever an earlier test enabled."""
    saved = model_module._ONE_ROW_KERNEL, model_module._DECODE_LAYERS
    use_one_row_kernel()
    use_decode_layers()
    yield
    model_module._ONE_ROW_KERNEL, model_module._DECODE_LAYERS = saved


def test_the_kernels_are_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("OVERFILL_ONE_ROW_KERNEL", raising=False)
    assert one_row.requested() and one_row.enabled() == one_row.load()
    monkeypatch.setenv("OVERFILL_ONE_ROW_KERNEL", "0")
    assert not one_row.requested() and not one_row.enabled()


@pytest.mark.parametrize("value,wanted", [("0", False), ("off", False), (" False ", False), ("NO", False), ("1", True),
                                          ("on", True), ("True", True), ("yes", True), ("", True)])
def test_the_switch_takes_the_usual_spellings(monkeypatch, value, wanted):
    monkeypatch.setenv("OVERFILL_ONE_ROW_KERNEL", value)
    assert one_row.requested() is wanted


@pytest.mark.parametrize("value", ["flase", "2", "disable", "o"])
def test_any_other_switch_value_is_refused(monkeypatch, value):
    monkeypatch.setenv("OVERFILL_ONE_ROW_KERNEL", value)
    with pytest.raises(OverfillError, match=f"OVERFILL_ONE_ROW_KERNEL='{value}' is not a switch"):
        one_row.requested()


def test_supported_says_why_not(monkeypatch):
    monkeypatch.setattr(one_row, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert one_row.supported() == (False, "the CPU lacks avx512bw, avx512vl, avx512_bf16")
    monkeypatch.setattr(one_row, "cpu_flags", lambda: frozenset(one_row.REQUIRED_FLAGS))
    assert one_row.supported() == (True, "")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("n, k", [(1, 32), (63, 37), (200, 288), (130, 833)])
def test_kernel_is_the_bf16_product(rows, n, k):
    torch.manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16()
    exact = x.float() @ w.float().T  # [rows, n]
    y = one_row.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # fp32 accumulation and one rounding to bf16, as F.linear: within bf16's half-ulp of the exact sum
    torch.testing.assert_close(y.float(), exact, rtol=2 ** -8, atol=1e-4 * k)
    assert (y.float() - exact).abs().max() <= (F.linear(x, w).float() - exact).abs().max() * 1.5 + 1e-3


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4])
def test_logits_are_the_fp32_sums(rows):
    """The output layer's variant: the same sums, not rounded to bf16 (no ties for greedy decoding)."""
    x, w = torch.randn(rows, 1, 288).bfloat16(), torch.randn(1000, 288).bfloat16()
    y = torch.ops.overfill.one_row_logits(x, w)
    assert y.dtype == torch.float32 and y.shape == (rows, 1, 1000)
    torch.testing.assert_close(y, x.float() @ w.float().T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.bfloat16(), one_row.linear(x, w), rtol=0, atol=0)


@needs_kernel
def test_kernel_takes_leading_dims_and_strided_inputs():
    x = torch.randn(1, 1, 2 * 96).bfloat16()[..., ::2]  # [1, 1, 96], not contiguous
    w = torch.randn(300, 2 * 96).bfloat16()[:, 96:]  # [300, 96], not contiguous
    y = one_row.linear(x, w)
    assert y.shape == (1, 1, 300)
    torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=2 ** -7, atol=1e-2)


@needs_kernel
def test_kernel_refuses_what_it_does_not_do():
    w = torch.randn(16, 32).bfloat16()
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        one_row.linear(torch.randn(9, 32).bfloat16(), w)
    with pytest.raises(RuntimeError, match="bf16 tensors only"):
        one_row.linear(torch.randn(1, 32), w.float())
    with pytest.raises(RuntimeError, match="x \\[..., K\\] and weight \\[N, K\\]"):
        one_row.linear(torch.randn(1, 31).bfloat16(), w)


def test_linear_routes_only_a_decode_steps_few_bf16_rows(no_kernel):
    calls = []
    use_one_row_kernel(lambda x, w: calls.append(x.shape) or F.linear(x, w), max_rows=4)
    w, b = torch.randn(8, 16).bfloat16(), torch.randn(8).bfloat16()
    with torch.no_grad():
        linear(torch.randn(1, 1, 16).bfloat16(), w)  # routed
        linear(torch.randn(4, 1, 16).bfloat16(), w)  # routed: 4 rows
        linear(torch.randn(5, 1, 16).bfloat16(), w)  # too many rows
        linear(torch.randn(1, 16), w.float())  # fp32
        linear(torch.randn(1, 16).bfloat16(), w, b)  # a bias
    linear(torch.randn(1, 16).bfloat16(), w)  # autograd on: training
    assert calls == [(1, 1, 16), (4, 1, 16)]
    use_one_row_kernel()
    with torch.no_grad():
        linear(torch.randn(1, 16).bfloat16(), w)
    assert len(calls) == 2


class PadOnly:
    pad_token_id, eos_token_id = 0, 2


@needs_kernel
def test_compiled_bf16_step_calls_the_kernel_and_decodes_as_eager(no_kernel, monkeypatch):
    """Where the layer stack does not apply (here: held off), the compiled step calls the one-row product."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("OVERFILL_ONE_ROW_KERNEL", "1")
    monkeypatch.setattr(one_row.LayerStack, "supports", lambda self, model, rows: False)

    full, small = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48)
    model = TwoStageModel(ours(full).bfloat16(), ours(small).bfloat16(), PadOnly())
    prompts = [[5, 17, 33, 9, 41, 7, 12], [8, 3], [60, 61, 62, 63, 64]]

    def greedy(compile):
        loop = BatchDecoder(model, prompts, [SamplingParams(max_new_tokens=10)] * 3, compile=compile)
        return torch.stack([loop.first()] + [loop.next() for _ in range(9)], 1).tolist()

    with one_row.off():
        reference = greedy(compile=False)  # F.linear
    tokens, code = run_and_get_code(lambda: greedy(compile=True))  # prepare_for_decoding turns it on
    assert model_module._ONE_ROW_KERNEL is not None
    assert any("one_row_linear" in c for c in code)
    assert tokens == reference
    with one_row.off():  # the step's graph is keyed on the setting: it recompiles, without the kernel
        tokens, code = run_and_get_code(lambda: greedy(compile=True))
    assert code and not any("one_row_linear" in c for c in code)
    assert tokens == reference


def test_load_is_false_where_not_supported(monkeypatch):
    monkeypatch.setattr(one_row, "cpu_flags", lambda: frozenset({"avx2"}))
    one_row.load.cache_clear()
    try:
        assert one_row.load() is False
    finally:
        one_row.load.cache_clear()


@needs_kernel
def test_off_holds_the_products_on_f_linear_and_restores(no_kernel, monkeypatch):
    monkeypatch.setenv("OVERFILL_ONE_ROW_KERNEL", "1")
    use_one_row_kernel(one_row.linear, one_row.MAX_ROWS)
    use_decode_layers(one_row.LAYER_STACK)
    with one_row.off():
        assert model_module._ONE_ROW_KERNEL is None and model_module._DECODE_LAYERS is None
        assert not one_row.enabled()
    assert model_module._ONE_ROW_KERNEL == (one_row.linear, one_row.MAX_ROWS) and one_row.enabled()
    assert model_module._DECODE_LAYERS is one_row.LAYER_STACK


# ------------------------------------------------------------------------------------------ the layer stack

def bf16_model(model_type="llama", seed=0, **overrides):
    return ours(tiny_hf_model(model_type, seed=seed, **overrides)).bfloat16().fuse_projections()


def filled_cache(model, rows, slots, prompt, seed=0):
    """A cache whose first `prompt` slots hold random K/V; row 0 is left-padded by 3 slots."""
    torch.manual_seed(seed)
    kv = model.new_kv_cache(rows, slots)
    for t in kv.k + kv.v:
        t.normal_()
    kv.valid[:, :prompt] = True
    kv.valid[0, :3] = False
    return kv


def one_step(model, kv, tokens, position, slot, stack: bool):
    """The final-norm hidden state `[B, 1, d]` of one decode step: layer by layer, or through the stack."""
    kv.valid.index_fill_(1, slot, True)
    mask = causal_mask(kv.valid, slot)
    with torch.no_grad():
        if not stack:
            return model.hidden(tokens, position, mask, kv, slot)
        return model.model.norm(one_row.LAYER_STACK(model, model.model.embed_tokens(tokens), model.rope(position),
                                                     kv, slot, mask))


def assert_as_close(got, layered, reference):
    """`got` is within bf16 noise of `reference`, as the layer-by-layer bf16 result is: on average, and at worst."""
    err, err_layered = (got.float() - reference).abs(), (layered.float() - reference).abs()
    assert err.mean() <= 1.3 * err_layered.mean() + 1e-3, (err.mean(), err_layered.mean())
    assert err.max() <= 2.5 * err_layered.max() + 1e-2, (err.max(), err_layered.max())


@needs_kernel
@pytest.mark.parametrize("model_type, rows, kv_heads, head_dim", [
    ("llama", 1, 2, 16), ("llama", 3, 2, 16), ("llama", 8, 2, 16), ("llama", 1, 4, 32), ("llama", 3, 4, 32),
    ("llama", 8, 4, 32), ("llama", 1, 1, 64), ("llama", 3, 1, 64), ("qwen2", 2, 2, 16), ("qwen3", 2, 2, 16)])
def test_layer_stack_is_the_bf16_step(no_kernel, model_type, rows, kv_heads, head_dim):
    """Hidden states and the K/V written: as close to the fp32 step as the layer-by-layer bf16 step is."""
    shape = dict(num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=3)
    model = bf16_model(model_type, **shape)
    exact = ours(tiny_hf_model(model_type, **shape)).fuse_projections()
    if model_type == "qwen2":  # biases far from 0, so that a dropped one shows
        for m in (model, exact):
            with torch.no_grad():
                for layer in m.model.layers:
                    layer.self_attn.fused_bias.copy_(torch.linspace(-1, 1, layer.self_attn.fused_bias.numel()))
    if model_type == "qwen3":  # norm weights far from 1, likewise
        for m in (model, exact):
            with torch.no_grad():
                for layer in m.model.layers:
                    layer.self_attn.q_norm.weight.copy_(torch.linspace(0.2, 2, head_dim))
                    layer.self_attn.k_norm.weight.copy_(torch.linspace(2, 0.2, head_dim))
    tokens = torch.randint(3, 128, (rows, 1), generator=torch.Generator().manual_seed(rows))
    position, slot = torch.full((rows, 1), 9), torch.tensor([12])
    caches = [filled_cache(model, rows, 20, 12) for _ in range(3)]
    caches[2] = caches[2].__class__(3, rows, kv_heads, 20, head_dim)  # fp32, the same K/V
    for dst, src in zip(caches[2].k + caches[2].v, caches[0].k + caches[0].v):
        dst.copy_(src)
    caches[2].valid.copy_(caches[0].valid)
    stack = one_step(model, caches[0], tokens, position, slot, stack=True)
    layered = one_step(model, caches[1], tokens, position, slot, stack=False)
    reference = one_step(exact, caches[2], tokens, position, slot, stack=False)
    assert_as_close(stack, layered, reference)
    for s, l_, r in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, caches[2].k + caches[2].v):
        assert_as_close(s[:, :, 12], l_[:, :, 12], r[:, :, 12])
        torch.testing.assert_close(s[:, :, :12], l_[:, :, :12], rtol=0, atol=0)  # only slot 12 is written
        torch.testing.assert_close(s[:, :, 13:], l_[:, :, 13:], rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 64])
def test_layer_stack_attends_over_long_caches_with_holes(no_kernel, head_dim):
    """Many 16-slot blocks of scores, invalid slots in the middle (rows that were padding, or moved)."""
    model = bf16_model(head_dim=head_dim, num_hidden_layers=2)
    exact = ours(tiny_hf_model(head_dim=head_dim, num_hidden_layers=2)).fuse_projections()
    caches = [filled_cache(model, 2, 160, 130, seed=5) for _ in range(2)]
    holes = torch.rand(2, 130, generator=torch.Generator().manual_seed(1)) < 0.3
    reference = KVCache(2, 2, 2, 160, head_dim)
    for kv in caches + [reference]:
        kv.valid[:, :130] = ~holes
    for dst, src in zip(reference.k + reference.v, caches[0].k + caches[0].v):
        dst.copy_(src)
    tokens, position, slot = torch.tensor([[7], [9]]), torch.tensor([[99], [120]]), torch.tensor([130])
    stack = one_step(model, caches[0], tokens, position, slot, True)
    layered = one_step(model, caches[1], tokens, position, slot, False)
    assert_as_close(stack, layered, one_step(exact, reference, tokens, position, slot, False))


@needs_kernel
def test_layer_stack_reads_only_the_masked_slots(no_kernel):
    """Garbage in masked-out slots (padding, slots beyond the step) changes nothing."""
    model = bf16_model()
    tokens, position, slot = torch.tensor([[7], [9]]), torch.tensor([[5], [8]]), torch.tensor([8])
    clean, dirty = filled_cache(model, 2, 16, 8), filled_cache(model, 2, 16, 8)
    for t in dirty.k + dirty.v:
        t[0, :, :3] = 1e4  # row 0's padding
        t[:, :, 9:] = float("nan")  # later slots
    torch.testing.assert_close(one_step(model, clean, tokens, position, slot, True),
                               one_step(model, dirty, tokens, position, slot, True), rtol=0, atol=0)


@needs_kernel
def test_layer_stack_writes_into_views_of_a_larger_cache(no_kernel):
    """The continuous batcher steps on the first rows of its cache, the hand-off on selected layers:
    the stack reads and writes those views, and nothing else."""
    model = bf16_model(num_hidden_layers=2)
    big = filled_cache(model, 4, 32, 10)
    big.k, big.v = big.k + [torch.randn_like(big.k[0])], big.v + [torch.randn_like(big.v[0])]  # a 3-layer full model
    before = [t.clone() for t in big.k + big.v]
    alone = KVCache(2, 2, 2, 32, 16, torch.bfloat16)  # what the view shows, as buffers of its own
    for dst, src in zip(alone.k + alone.v, [big.k[0], big.k[2], big.v[0], big.v[2]]):
        dst.copy_(src[:2])
    alone.valid.copy_(big.valid[:2])
    tokens, position, slot = torch.tensor([[7], [9]]), torch.tensor([[8], [9]]), torch.tensor([10])
    got = one_step(model, big.first_rows(2).select_layers([0, 2]), tokens, position, slot, True)
    want = one_step(model, alone, tokens, position, slot, True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for layer, (after, old) in enumerate(zip(big.k + big.v, before)):
        changed = (after != old).any(-1)  # [B, H_kv, S]
        if layer % 3 == 1:  # not in the view
            assert not changed.any()
        else:
            assert changed[:2, :, 10].all() and not changed[2:].any() and not changed[:, :, :10].any()
            assert not changed[:, :, 11:].any()


def test_layer_stack_supports_the_four_architectures_in_bf16_only():
    stack = one_row.LayerStack()
    assert stack.supports(bf16_model("llama"), 1) and stack.supports(bf16_model("mistral"), 8)
    assert stack.supports(bf16_model("qwen2"), 1) and stack.supports(bf16_model("qwen3"), 1)
    assert not stack.supports(bf16_model("llama"), 9)
    assert not stack.supports(bf16_model("llama", attention_bias=True), 1)  # an o_proj bias
    assert not stack.supports(bf16_model(head_dim=24), 1)
    assert not stack.supports(ours(tiny_hf_model()).fuse_projections(), 1)  # fp32
    assert not stack.supports(ours(tiny_hf_model()).bfloat16(), 1)  # not fused


def test_the_route_is_taken_only_for_a_cached_one_token_step_without_autograd(no_kernel):
    calls = []

    class Spy(one_row.LayerStack):
        def __call__(self, model, x, rope, kv_cache, slots, mask):
            calls.append(x.shape)
            return x

    use_decode_layers(Spy())
    model = bf16_model()
    kv = model.new_kv_cache(1, 8)
    tok, pos, slot = torch.tensor([[5]]), torch.tensor([[0]]), torch.tensor([0])
    mask = causal_mask(kv.valid, slot)
    with torch.no_grad():
        assert decodes_with_layer_stack(model, 1) and not decodes_with_layer_stack(model, 9)
        model.hidden(tok, pos, mask, kv, slot)  # routed
        model.hidden(tok, pos, causal_mask(torch.ones(1, 1, dtype=torch.bool), slot))  # no cache
        two = torch.arange(2)
        model.hidden(torch.tensor([[5, 6]]), torch.tensor([[0, 1]]), causal_mask(kv.valid, two), kv, two)  # 2 tokens
    model.hidden(tok, pos, mask, kv, slot)  # autograd: training
    assert calls == [(1, 1, 64)]


@needs_kernel
def test_layer_stack_refuses_what_it_does_not_do(no_kernel):
    model = bf16_model()
    kv = filled_cache(model, 1, 16, 4)
    x, rope, slot = model.model.embed_tokens(torch.tensor([[5]])), model.rope(torch.tensor([[4]])), torch.tensor([4])
    mask = causal_mask(kv.valid, slot)
    op = torch.ops.overfill.decode_layers
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="x \\[B, d\\] bf16"):
            one_row.LAYER_STACK(model, x.float(), rope, kv, slot, mask)
        with pytest.raises(RuntimeError, match="slot < S_max"):
            one_row.LAYER_STACK(model, x, rope, kv, torch.tensor([16]), mask)
        layer = model.model.layers[0]
        weights = [layer.input_layernorm.weight, layer.self_attn.fused_weight, layer.self_attn.o_proj.weight,
                   layer.post_attention_layernorm.weight, layer.mlp.fused_weight, layer.mlp.down_proj.weight]
        cos, sin = (t.reshape(1, -1) for t in rope)
        with pytest.raises(RuntimeError, match="6 weights and one K and V buffer per layer"):
            op(x[:, 0], weights, kv.k, kv.v, cos, sin, mask.reshape(1, -1), 4, 4, 2, 1e-5, False, False)
        bad = weights[:1] + [weights[1][:-1]] + weights[2:]  # q/k/v one row short
        with pytest.raises(RuntimeError, match="layer 0 weight 1 has the wrong shape"):
            op(x[:, 0], bad, kv.k[:1], kv.v[:1], cos, sin, mask.reshape(1, -1), 4, 4, 2, 1e-5, False, False)


@needs_kernel
@pytest.mark.parametrize("compile", [False, True])
def test_engine_decodes_through_the_stack_as_layer_by_layer(no_kernel, monkeypatch, compile):
    """Greedy tokens of the two-stage engine: the stack (eager, compiled or not) agrees with the
    layer-by-layer bf16 step on nearly every token, and the compiled route compiles nothing for it."""
    monkeypatch.delenv("OVERFILL_ONE_ROW_KERNEL", raising=False)
    full, small = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48)
    model = TwoStageModel(ours(full).bfloat16(), ours(small).bfloat16(), PadOnly())
    prompts = [[5, 17, 33, 9, 41, 7, 12], [8, 3], [60, 61, 62, 63, 64]]

    def greedy():
        loop = BatchDecoder(model, prompts, [SamplingParams(max_new_tokens=12)] * 3, compile=compile)
        return torch.stack([loop.first()] + [loop.next() for _ in range(11)], 1)

    with one_row.off():
        reference = greedy()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    tokens = greedy()
    assert model_module._DECODE_LAYERS is one_row.LAYER_STACK
    assert counters["stats"]["unique_graphs"] == 0  # nothing compiled: every step went through the stack
    assert (tokens == reference).float().mean() >= 0.9


@needs_kernel
def test_a_row_decodes_through_the_stack_as_alone(no_kernel, monkeypatch):
    """Each row's sums run in the same order whatever the batch: a prompt's greedy tokens in a
    left-padded batch of three are exactly its tokens alone."""
    monkeypatch.delenv("OVERFILL_ONE_ROW_KERNEL", raising=False)
    full, small = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48)
    model = TwoStageModel(ours(full).bfloat16(), ours(small).bfloat16(), PadOnly())
    prompts = [[5, 17, 33, 9, 41, 7, 12], [8, 3], [60, 61, 62, 63, 64]]

    def greedy(batch):
        loop = BatchDecoder(model, batch, [SamplingParams(max_new_tokens=12)] * len(batch))
        return torch.stack([loop.first()] + [loop.next() for _ in range(11)], 1).tolist()

    together = greedy(prompts)
    assert model_module._DECODE_LAYERS is one_row.LAYER_STACK
    assert together == [greedy([p])[0] for p in prompts]


def test_the_kernels_build_wherever_the_cpu_has_the_instructions():
    """Else every test above would skip, and a broken build would pass unseen."""
    if one_row.supported()[0]:
        assert one_row.load()


def test_a_failed_build_is_remembered_until_the_source_changes(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("OVERFILL_CACHE", str(tmp_path))
    calls = []

    def broken(**kwargs):
        calls.append(kwargs["build_directory"])
        raise RuntimeError("Error building extension 'overfill_one_row': no compiler")

    monkeypatch.setattr(ext, "load", broken)
    assert one_row._build() is False and one_row._build() is False
    assert len(calls) == 1  # the second call read the remembered failure
    assert "no compiler" in (one_row.build_dir() / one_row.FAILED_FILE).read_text()
    source = tmp_path / "one_row.cpp"
    source.write_text(one_row.SOURCE.read_text() + "// changed\n")
    monkeypatch.setattr(one_row, "SOURCE", source)
    assert one_row._build() is False and len(calls) == 2  # a new source: built again


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").write_text("")
    (tmp_path / "builder.pid").write_text(str(os.getpid()))
    one_row._remove_stale_lock(tmp_path)
    assert (tmp_path / "lock").exists()  # its builder (this process) is alive
    (tmp_path / "builder.pid").write_text(dead.stdout.strip())
    one_row._remove_stale_lock(tmp_path)
    assert not (tmp_path / "lock").exists() and "stale build lock" in capsys.readouterr().err


def test_collecting_the_tests_builds_nothing(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "OVERFILL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "tests/test_one_row.py"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert not (tmp_path / "kernels").exists()
