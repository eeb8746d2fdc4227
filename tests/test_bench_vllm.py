"""The vLLM server benchmark's bookkeeping: per-round ratios and medians on synthetic passes."""
import pytest

from benchmarks.vllm.bench_vllm import medians, ratios, table


def run(system, round_, rate, concurrency=1, dtype="bfloat16"):
    return {"dtype": dtype, "concurrency": concurrency, "system": system, "round": round_,
            "completion_tokens_per_s": rate, "ttft_s": {"p50": 0.1 * (round_ + 1)},
            "latency_s": {"p50": 1.0 + round_}, "errors": round_ % 2}


def test_ratios_are_taken_round_by_round():
    # round 1 is twice as slow for every server (machine noise): the per-round ratio is unchanged
    runs = [run("vllm-full", 0, 30.0), run("vllm-overfill", 0, 60.0), run("overfill-serve", 0, 40.0),
            run("vllm-full", 1, 15.0), run("vllm-overfill", 1, 30.0), run("overfill-serve", 1, 30.0),
            run("vllm-full", 2, 20.0), run("vllm-overfill", 2, 50.0), run("overfill-serve", 2, 25.0)]
    [r] = ratios(runs)
    assert (r["dtype"], r["concurrency"], r["rounds"]) == ("bfloat16", 1, 3)
    assert r["overfill_over_full_on_vllm"] == {"median": 2.0, "min": 2.0, "max": 2.5}
    assert r["vllm_over_overfill_serve"] == {"median": 1.5, "min": 1.0, "max": 2.0}


def test_medians_and_table():
    runs = [run(s, n, rate, concurrency=8) for n in range(3)
            for s, rate in (("vllm-full", 10.0 + n), ("vllm-overfill", 20.0 + 3 * n), ("overfill-serve", 12.0))]
    rows = {r["system"]: r for r in medians(runs)}
    assert rows["vllm-overfill"]["completion_tokens_per_s"] == 23.0
    assert rows["vllm-full"]["ttft_p50_s"] == pytest.approx(0.2) and rows["vllm-full"]["latency_p50_s"] == 2.0
    assert rows["overfill-serve"]["errors"] == 1
    text = table({"runs": runs, "ratios": ratios(runs)})
    assert "| bfloat16 | 8 | vllm-overfill | 23.0 |" in text
    assert "| bfloat16 | 8 | 3 | 2.091 (2.0-2.167) |" in text


def test_an_unfinished_round_is_left_out_of_the_ratios():
    runs = [run("vllm-full", 0, 30.0), run("vllm-overfill", 0, 60.0), run("overfill-serve", 0, 40.0),
            run("vllm-full", 1, 15.0)]  # the run stopped after one pass of round 1
    [r] = ratios(runs)
    assert r["rounds"] == 1 and r["overfill_over_full_on_vllm"]["median"] == 2.0
    assert ratios(runs[-1:]) == []
