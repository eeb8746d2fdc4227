"""The bf16 one-row kernel (engine/one_row.py) and the model's routing of products to it."""
import pytest
import torch
import torch.nn.functional as F

import overfill.model as model_module
from overfill.engine import BatchDecoder, SamplingParams, one_row
from overfill.model import linear, use_one_row_kernel
from overfill.two_stage import TwoStageModel
from conftest import ours, tiny_hf_model

needs_kernel = pytest.mark.skipif(not one_row.load(), reason="the CPU lacks AVX512-BF16 (or no compiler)")


@pytest.fixture
def no_kernel():
    """Each test starts and ends with the products on F.linear, whatever an earlier test enabled."""
    saved = model_module._ONE_ROW_KERNEL
    use_one_row_kernel()
    yield
    model_module._ONE_ROW_KERNEL = saved


def test_the_kernel_is_opt_in(monkeypatch):
    monkeypatch.delenv("OVERFILL_ONE_ROW_KERNEL", raising=False)
    assert not one_row.requested() and not one_row.enabled()
    monkeypatch.setenv("OVERFILL_ONE_ROW_KERNEL", "1")
    assert one_row.requested() and one_row.enabled() == one_row.load()


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
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("OVERFILL_ONE_ROW_KERNEL", "1")

    full, small = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48)
    model = TwoStageModel(ours(full).bfloat16(), ours(small).bfloat16(), PadOnly())
    prompts = [[5, 17, 33, 9, 41, 7, 12], [8, 3], [60, 61, 62, 63, 64]]

    def greedy(compile):
        loop = BatchDecoder(model, prompts, [SamplingParams(max_new_tokens=10)] * 3, compile=compile)
        return torch.stack([loop.first()] + [loop.next() for _ in range(9)], 1).tolist()

    reference = greedy(compile=False)  # F.linear: the kernel is not on yet
    tokens, code = run_and_get_code(lambda: greedy(compile=True))  # prepare_for_compile turns it on
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
    with one_row.off():
        assert model_module._ONE_ROW_KERNEL is None and not one_row.enabled()
    assert model_module._ONE_ROW_KERNEL == (one_row.linear, one_row.MAX_ROWS) and one_row.enabled()
