import json

import numpy as np
import pytest
import torch

from overfill.bench import (LLAMA32_1B, LLAMA32_3B, BenchConfig, bench, floor_seconds, kv_bytes_per_token,
                            measure_bandwidth, pruned_config, random_model, time_engine, time_hf,
                            weight_bytes_per_step)
from overfill.errors import OverfillError
from overfill.engine import BatchDecoder, SamplingParams
from overfill.model import ModelArgs
from overfill.two_stage import TwoStageModel, check_compatible
from conftest import ours, tiny_hf_config, tiny_hf_model


class PadOnly:
    pad_token_id, eos_token_id = 0, 2


PROMPTS = [[5, 17, 33, 9, 41, 7, 12], [8, 3], [60, 61, 62, 63, 64]]


def greedy(model, prompts, n, compile=False, refresh_every=0):
    loop = BatchDecoder(model, prompts, [SamplingParams(max_new_tokens=n)] * len(prompts),
                        refresh_every=refresh_every, compile=compile)
    return torch.stack([loop.first()] + [loop.next() for _ in range(n - 1)], 1).tolist()


# ---------------------------------------------------------------------------- the engine the bench times

def test_compiled_engine_equals_eager_reference_with_and_without_batching():
    full, small = tiny_hf_model("llama", seed=0), tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48)
    model = TwoStageModel(ours(full), ours(small), PadOnly())
    # Mixed prompt lengths (left padding), with a refresh by the full model between compiled steps.
    assert greedy(model, PROMPTS, 12, compile=True, refresh_every=4) == greedy(model, PROMPTS, 12, refresh_every=4)
    assert greedy(model, PROMPTS, 12, compile=True) == greedy(model, PROMPTS, 12)
    # Batch 1 takes the CPU's one-row matrix-product path.
    assert greedy(model, PROMPTS[:1], 12, compile=True) == greedy(model, PROMPTS[:1], 12)


def test_engine_and_transformers_generate_time_the_same_tokens():
    hf = tiny_hf_model("llama")
    model = TwoStageModel(ours(hf), None, PadOnly())
    prompts = [[5, 17, 33, 9], [8, 3, 60, 61]]
    engine, reference = time_engine(model, prompts, 6), time_hf(hf, prompts, 6, pad_id=0)
    assert engine.tokens == reference.tokens
    for t in (engine, reference):
        assert len(t.tokens[0]) == 6 and len(t.steps) == 5
        assert 0 < t.ttft <= t.total and sum(t.steps) <= t.total + 1e-9


# ---------------------------------------------------------------------------- shapes and bytes

def test_llama32_shapes_and_the_pruned_decoder():
    full, reference = ModelArgs.from_hf(LLAMA32_3B), ModelArgs.from_hf(LLAMA32_1B)
    decoder = ModelArgs.from_hf(pruned_config(LLAMA32_3B, 0.45, 0.45))
    assert round(full.num_params() / 1e9, 2) == 3.21 and round(reference.num_params() / 1e9, 2) == 1.24
    assert (decoder.hidden_size, decoder.intermediate_size) == (1680, 4512)  # multiples of 16 (and of 24 heads)
    assert decoder.hidden_size % 16 == 0 and decoder.hidden_size % decoder.num_attention_heads == 0
    assert check_compatible(full, decoder) == []
    assert 0.38 < decoder.num_params() / full.num_params() < 0.42


def test_random_model_is_transformers_model_with_shared_weights():
    config = tiny_hf_config("qwen2").to_dict()
    model, hf = random_model(config, torch.float32, torch.device("cpu"), seed=3)
    assert model.model.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(3, 128, (2, 7))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(model(tokens, torch.arange(7).expand(2, 7), mask), hf(tokens).logits,
                               atol=1e-5, rtol=1e-4)


def test_bytes_per_step_and_floor():
    untied = ours(tiny_hf_model("llama"))
    tied = ours(tiny_hf_model("llama", tie_word_embeddings=True))
    embed = 128 * 64 * 4
    assert weight_bytes_per_step(untied) == untied.num_bytes() - embed  # the table is only gathered from
    assert weight_bytes_per_step(tied) == tied.num_bytes()  # ... unless lm_head reads it
    assert kv_bytes_per_token(untied) == 2 * 2 * 2 * 16 * 4  # K and V, layers, KV heads, head_dim, fp32
    # batch 3, prompt 10, output 6: steps attend 11..15 slots, 13 on average; 1 GB/s
    expected = (weight_bytes_per_step(untied) + 512 * 3 * 13) / 1e9
    assert floor_seconds(untied, 3, 10, 6, 1.0) == pytest.approx(expected)
    with_refresh = floor_seconds(untied, 3, 10, 6, 1.0, refresh_model=tied, refresh_every=4)
    assert with_refresh == pytest.approx(expected + weight_bytes_per_step(tied) / 4 / 1e9)
    bandwidth = measure_bandwidth(torch.device("cpu"), nbytes=1 << 20)
    assert bandwidth["gbps"] == max(bandwidth["copy_gbps"], bandwidth["read_gbps"]) > 0


# ---------------------------------------------------------------------------- the whole bench

def test_bench_writes_consistent_results(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "full")
    out = tmp_path / "results" / "bench.json"
    written = bench(BenchConfig(full=str(tmp_path / "full"), prompt_len=[6], output_len=[3], batch_size=[1, 2],
                                refresh_every=[2], repeats=2, warmup=0, out=str(out)))
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"full", "decoder"}
    full, decoder = result["models"]["full"], result["models"]["decoder"]
    assert decoder["shape"]["hidden"] < full["shape"]["hidden"]
    assert decoder["kv_bytes_per_token"] == full["kv_bytes_per_token"]  # pruning keeps the cache layout
    assert [(c["prompt_len"], c["output_len"], c["batch_size"]) for c in result["configs"]] == [(6, 3, 1), (6, 3, 2)]
    gbps = result["bandwidth"]["gbps"]
    for cfg in result["configs"]:
        runs, B, n = cfg["runs"], cfg["batch_size"], cfg["output_len"]
        assert list(runs) == ["full", "decoder", "overfill", "overfill+refresh2", "hf"]
        assert cfg["hf_tokens_equal_full"] is True
        for r in runs.values():
            assert len(r["per_repeat"]["e2e_s"]) == 2
            assert r["tokens_per_s"] == pytest.approx(B * n / r["e2e_s"])
            assert r["tpot_s"] <= r["tpot_p90_s"] and r["ttft_s"] < r["e2e_s"]
            assert r["floor_fraction"] == pytest.approx(r["floor_s"] / r["tpot_s"])
            assert r["kv_cache_bytes"] == r["kv_bytes_per_token"] * B * (cfg["prompt_len"] + n)
        mean_slots = cfg["prompt_len"] + n / 2  # decode step i attends prompt_len + i + 1 slots
        overfill_bytes = decoder["weight_bytes_per_step"] + decoder["kv_bytes_per_token"] * B * mean_slots
        assert runs["overfill"]["floor_s"] == pytest.approx(overfill_bytes / gbps / 1e9)
        refresh_floor = runs["overfill"]["floor_s"] + full["weight_bytes_per_step"] / 2 / gbps / 1e9
        assert runs["overfill+refresh2"]["floor_s"] == pytest.approx(refresh_floor)
        per_round = np.array(runs["full"]["per_repeat"]["tpot_s"]) / np.array(runs["overfill"]["per_repeat"]["tpot_s"])
        assert cfg["ratios"]["full/overfill tpot"]["median"] == pytest.approx(float(np.median(per_round)))
    assert "| overfill+refresh2 |" in out.with_suffix(".md").read_text()
    for name in ("bench_tpot.png", "bench_batch_size.png"):
        assert (out.parent / name).stat().st_size > 0
    assert not (out.parent / "bench_prompt_len.png").exists()  # not swept
    assert written == [out, out.with_suffix(".md"), out.parent / "bench_tpot.png", out.parent / "bench_batch_size.png"]


def test_bench_in_bf16_records_the_precision_and_halves_the_bytes(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "full")
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.json"
        bench(BenchConfig(full=str(tmp_path / "full"), prompt_len=[6], output_len=[3], systems=["full", "hf"],
                          refresh_every=[], repeats=1, warmup=0, precision=precision, out=str(out), plots=False))
        runs[precision] = json.loads(out.read_text())
    assert runs["fp32"]["precision"] == "fp32" and runs["bf16"]["precision"] == "bf16"
    assert "asked for" in runs["bf16"]["precision_reason"]
    fp32, bf16 = runs["fp32"]["models"]["full"], runs["bf16"]["models"]["full"]
    assert bf16["dtype"] == "torch.bfloat16"
    assert 2 * bf16["weight_bytes_per_step"] == fp32["weight_bytes_per_step"]
    assert 2 * bf16["kv_bytes_per_token"] == fp32["kv_bytes_per_token"]


def test_bad_input_is_a_clear_error(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "full")
    base = dict(full=str(tmp_path / "full"), out=str(tmp_path / "b.json"), systems=["full"])
    for bad, message in ((dict(output_len=[1]), "output-len"), (dict(systems=["fast"]), "unknown system"),
                         (dict(engine=["jit"]), "unknown system or engine"),
                         (dict(systems=["reference"]), "reference"), (dict(batch_size=[0]), "batch-size"),
                         (dict(refresh_every=[-1]), "refresh-every"),
                         (dict(prompt_len=[250], output_len=[10]), "context window")):
        with pytest.raises(OverfillError, match=message):
            bench(BenchConfig(**{**base, **bad}))
    assert not (tmp_path / "b.json").exists()


def test_the_gpu_script_names_every_result_after_the_gpu(tmp_path):
    """benchmarks/latency/llama32_3b_gpu.sh, with `python` stubbed to print its arguments."""
    import os
    import subprocess
    from pathlib import Path

    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$@"\n')
    stub.chmod(0o755)
    script = Path(__file__).parents[1] / "benchmarks/latency/llama32_3b_gpu.sh"
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "GPU": "h200"}
    lines = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    outs = [line.split("--out ")[1].split()[0] for line in lines]
    assert [Path(o).name for o in outs] == [f"llama32_3b_h200{s}.json" for s in
                                            ("", "_hf_static", "_prompt", "_output", "_batch")]
