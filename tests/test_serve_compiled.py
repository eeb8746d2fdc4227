"""The compiled server under concurrent load (issue #30).

The warm-up compiles every graph a request can need (any row count, sampling kind and cache
length), so that no request compiles on the scheduler thread, where torch's per-thread recompile
limit once failed every running request; a graph that fails to compile or to run leaves its requests
to eager steps; start-up says what it compiles into a cache kept for the next start; and 32
concurrent streams with mixed sampling all complete, with the same greedy and seeded outputs
whether or not one client disconnects and another sends a bad request.

Tiny random pair with SmolLM2's tokenizer (test_serve.py), compiled as `overfill serve` does.
"""
import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from torch._dynamo.utils import counters

from overfill.commands import serve as serve_module
from overfill.commands.serve import ServeArgs, serve_command
from overfill.engine import ContinuousBatcher, WarmedVariant, continuous
from overfill.serve import create_app
from overfill.two_stage import TwoStageModel
from test_serve import NAME, TIMEOUT, chat, chat_ids, health, job, run_out, serving, text_of, tiny_pair_dirs

WINDOW = 512
MAX_BATCH = 8
STREAMS = 32
STREAM_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As `OMP_NUM_THREADS=1 overfill serve` on a busy machine. A graph is guarded on the number of torch
    threads, so a warm-up that changed it would leave every graph to be compiled again by the requests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return tiny_pair_dirs(tmp_path_factory, window=WINDOW)


@pytest.fixture(scope="module")
def warm_url(pair_dirs):
    """A compiled server, warmed up as `overfill serve` does before it listens."""
    app = create_app(TwoStageModel.from_refs(*pair_dirs), NAME, max_batch=MAX_BATCH, compile=True)
    app.state.server.scheduler.batcher.warm_up()
    with serving(app) as url:
        yield url


def graphs_compiled() -> int:
    """Graphs dynamo has made in this process, by its own count."""
    return counters["stats"]["unique_graphs"]


def post_chat(url, body):
    return httpx.post(url + "/v1/chat/completions", json={"model": NAME, **body}, timeout=TIMEOUT)


def stream_chat(url, body) -> dict:
    """A streamed chat completion's text and finish reason, or its error."""
    text, finish = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json={"model": NAME, "stream": True, **body},
                      timeout=TIMEOUT) as response:
        if response.status_code != 200:
            return {"error": f"{response.status_code} {response.read()[:200]!r}"}
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            finish = choice["finish_reason"] or finish
    return {"text": "".join(text), "finish_reason": finish}


# ---------------------------------------------------------------------------- every graph at warm-up

SAMPLINGS = {  # a request of each sampling a client may send; "default" leaves temperature out (1.0, as OpenAI)
    "default": {},
    "greedy": {"temperature": 0},
    "top_p": {"temperature": 0.8, "top_p": 0.9},
    "top_k": {"top_k": 20},
    "seeded": {"seed": 11},
}


def test_after_the_warm_up_no_request_compiles_or_fails(warm_url):
    # Bursts as in the issue (3, then 6, then 12: every request of the second one got a 500), of every
    # sampling, and a prompt long enough to grow the cache past its first 256 slots.
    graphs = graphs_compiled()
    before = health(warm_url)
    replies = []
    for burst in (1, 3, 6, 12):
        for sampling in SAMPLINGS.values():
            with ThreadPoolExecutor(burst) as pool:
                replies += pool.map(lambda i: post_chat(warm_url, {"messages": chat(f"burst {i}"), "max_tokens": 4,
                                                                   **sampling}), range(burst))
    replies.append(post_chat(warm_url, {"messages": chat("long " * 300), "max_tokens": 4}))
    assert [r.status_code for r in replies if r.status_code != 200] == []
    stats = health(warm_url)
    assert stats["failed"] == before["failed"]
    assert graphs_compiled() == graphs and stats["compiles"] == 0


# ---------------------------------------------------------------------------- the load test

def mixed_streams() -> list[dict]:
    """STREAMS request bodies, the samplings in turn; all but the unseeded sampled ones are reproducible."""
    names = list(SAMPLINGS)
    return [{"messages": chat(f"stream {i}: tell me something about {i * 7}"), "max_tokens": STREAM_TOKENS,
             "ignore_eos": True, **SAMPLINGS[names[i % len(names)]],
             **({"seed": 100 + i} if names[i % len(names)] in ("top_p", "top_k") else {})}
            for i in range(STREAMS)]


def reproducible(body: dict) -> bool:
    return body.get("temperature") == 0 or "seed" in body


def disconnect_mid_stream(url, started: threading.Event) -> None:
    """A client that reads a few chunks of a long stream, then goes away."""
    body = {"model": NAME, "messages": chat("a long answer, please"), "max_tokens": 400, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        started.set()


def test_32_mixed_streams_complete_and_a_disconnect_or_bad_request_changes_no_output(warm_url):
    bodies = mixed_streams()
    before = health(warm_url)

    def run(with_trouble: bool) -> list[dict]:
        with ThreadPoolExecutor(STREAMS + 2) as pool:
            if with_trouble:
                started = threading.Event()
                gone = pool.submit(disconnect_mid_stream, warm_url, started)
                assert started.wait(TIMEOUT)
                bad = pool.submit(post_chat, warm_url, {"messages": chat("hi"), "top_p": 0})
            results = list(pool.map(lambda body: stream_chat(warm_url, body), bodies))
            if with_trouble:
                gone.result()
                assert bad.result().status_code == 400
        return results

    alone, troubled = run(with_trouble=False), run(with_trouble=True)
    for results in (alone, troubled):
        assert [r for r in results if "error" in r] == []
        assert {r["finish_reason"] for r in results} == {"length"}
    for body, a, b in zip(bodies, alone, troubled):
        if reproducible(body):
            assert a == b, body
    stats = health(warm_url)
    assert stats["completed"] - before["completed"] == 2 * STREAMS
    assert stats["cancelled"] - before["cancelled"] == 1 and stats["failed"] == before["failed"]
    assert stats["compiles"] == 0 and stats["peak_rows"] == MAX_BATCH


# ---------------------------------------------------------------------------- failures fall back to eager steps

def failing_inductor(how: str):
    """inductor's entry point, made to fail at compile time or to return a graph that fails when run."""
    def compile_or_fail(*args, **kwargs):
        if how == "compile":
            raise RuntimeError("injected compile failure")

        def run(*inputs):
            raise RuntimeError("injected run failure")
        return run

    return compile_or_fail


@pytest.mark.parametrize("how,width", [("compile", 24), ("run", 40)])  # a decoder of its own shape: new graphs
def test_a_graph_that_fails_to_compile_or_run_leaves_its_requests_to_eager_steps(tmp_path_factory, monkeypatch,
                                                                                  caplog, how, width):
    model = TwoStageModel.from_refs(*tiny_pair_dirs(tmp_path_factory, WINDOW, decoder_hidden=width))

    def decode(compile):
        batcher = ContinuousBatcher(model, max_batch=4, compile=compile)
        settings = [dict(max_new_tokens=6, ignore_eos=True), dict(max_new_tokens=9, ignore_eos=True),
                    dict(max_new_tokens=12, ignore_eos=True, temperature=0.8, top_k=50, seed=3)]
        jobs = [job(model, chat_ids(model, f"prompt {i}" + " more" * i), **p) for i, p in enumerate(settings)]
        batcher.admit(deque(j for j, _ in jobs))
        run_out(batcher)
        return [text_of(events) for _, events in jobs], batcher.stats

    from torch._inductor import compile_fx

    monkeypatch.setattr(compile_fx, "compile_fx", failing_inductor(how))
    with caplog.at_level(logging.WARNING, logger="overfill.engine.step"):
        compiled, stats = decode(compile=True)
    monkeypatch.undo()
    assert compiled == decode(compile=False)[0]
    assert stats.failed == 0 and stats.completed == 3
    # the warnings show the compiled path was taken and failed over (a count of compiles would not: the sampling
    # graph may come compiled from an earlier test of the same process)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings and all(f"injected {how}" in w and "eagerly" in w for w in warnings)
    assert len(set(warnings)) == len(warnings) < stats.steps  # each failing graph is logged once


# ---------------------------------------------------------------------------- start-up

class NoServer:
    """Stands in for uvicorn: serve_command returns once its warm-up is done, leaving the app here."""

    apps = []

    def __init__(self, app, **options):
        self.apps.append(app)

    def run(self, sockets):
        sockets[0].close()


def test_start_up_says_what_it_compiles_into_a_kept_cache_and_requests_compile_nothing_after(
        pair_dirs, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(serve_module, "uvicorn_server", NoServer)
    monkeypatch.setenv("OVERFILL_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # torch sets it at its first compile
    with caplog.at_level(logging.INFO, logger="overfill.serve"):
        serve_command(ServeArgs(full=str(pair_dirs[0]), decoder=str(pair_dirs[1]), port=0, max_batch=4,
                                model_name=NAME))
    with serving(NoServer.apps.pop()) as url:
        with ThreadPoolExecutor(len(SAMPLINGS)) as pool:
            replies = list(pool.map(lambda sampling: post_chat(url, {"messages": chat("hi"), "max_tokens": 16,
                                                                     **sampling}), SAMPLINGS.values()))
        stats = health(url)
    assert [r.status_code for r in replies] == [200] * len(SAMPLINGS)
    assert stats["compiles"] == 0 and stats["peak_rows"] >= 2
    cache = tmp_path / "compile"
    assert cache.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)

    lines = [r.getMessage() for r in caplog.records]
    announce = next(i for i, line in enumerate(lines) if line.startswith("compiling the decode step"))
    for variant in ("1 row, greedy", "2 rows, greedy", "1 row, temperature", "2 rows, top-k/top-p"):
        assert variant in lines[announce]
    assert str(cache) in lines[announce] and "compile workers" in lines[announce]
    progress = [line for line in lines if line.startswith("compiled ") and "/6 (" in line]
    assert len(progress) == 6 and all("s left" in line for line in progress[:-1])
    serving_line = next(i for i, line in enumerate(lines) if line.startswith("serving"))
    assert announce < lines.index(progress[-1]) < serving_line


def test_the_warm_up_compiles_at_the_fewest_rows_the_layer_stack_leaves_to_the_graphs(pair_dirs, monkeypatch):
    # bf16 on a CPU with AVX512-BF16, the layer stack decodes steps of 1-8 rows eagerly: a warm-up at 1 and
    # 2 rows would compile nothing, and the first batch of 9 would compile on the scheduler thread.
    monkeypatch.setattr(continuous, "decodes_with_layer_stack", lambda model, rows: rows <= 8)
    batcher = ContinuousBatcher(TwoStageModel.from_refs(*pair_dirs), max_batch=16)
    assert sorted(batcher.warm_up_variants()) == [(9, kind) for kind in ("filtered", "greedy", "temperature")]


def test_the_time_left_counts_a_decoder_graph_for_each_new_row_count():
    variants = [(rows, kind) for rows in (1, 2) for kind in ("greedy", "temperature", "filtered")]
    warmed = [WarmedVariant(1, "greedy", 40.0, 1), WarmedVariant(1, "temperature", 4.0, 1)]
    assert serve_module.seconds_left(variants, warmed) == 40.0 + 3 * 4.0
    assert serve_module.seconds_left(variants, warmed[:1]) == 5 * 40.0  # nothing else to go by yet
    assert serve_module.seconds_left(variants, warmed + [WarmedVariant(1, "filtered", 6.0, 1)] * 4) == 0
