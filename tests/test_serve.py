"""The OpenAI-compatible server.

The batch engine is checked against `stream_batch` run on each request alone (greedy and
seeded sampling, joins into a running batch, column shifts, compaction, cancellation, errors);
the HTTP layer is driven with the official `openai` client (and httpx for raw bytes) against a
real uvicorn server on 127.0.0.1, serving a tiny random two-stage pair with SmolLM2's tokenizer.
"""
import json
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from overfill.errors import OverfillError
from overfill.generate import SamplingParams, encode, stream_batch
from overfill.commands.serve import ServeArgs, serve_command
from overfill.engine.continuous import ContinuousBatcher, row_bucket
from overfill.serve import create_app, listen_socket, text_job, uvicorn_server
from overfill.two_stage import TwoStageModel
from conftest import tiny_hf_model

NAME = "tiny-overfill"
WINDOW = 2048
TIMEOUT = 30


def tiny_pair_dirs(tmp_path_factory, window=WINDOW, decoder_hidden=16):
    """The directories of a tiny random full model and a narrower decoder, with a real chat tokenizer."""
    from overfill.hub import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=window, bos_token_id=1,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dirs = []
    for name, seed, width in (("full", 0, {}), ("decoder", 1, dict(hidden_size=decoder_hidden, intermediate_size=32))):
        out = tmp_path_factory.mktemp(name)
        tiny_hf_model("llama", seed=seed, **{**shape, **width}).save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs.append(out)
    return dirs


def tiny_pair(tmp_path_factory, window=WINDOW):
    """The pair of `tiny_pair_dirs`, loaded: the decoder reads the full model's cache."""
    pair = TwoStageModel.from_refs(*tiny_pair_dirs(tmp_path_factory, window))
    assert pair.is_two_stage and pair.context_window == window
    return pair


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_pair(tmp_path_factory)


def alone(model, prompt_ids, params, refresh_every=0):
    """The reference: the request decoded by itself with `stream_batch`."""
    for _, _, state in stream_batch(model, [prompt_ids], params, refresh_every=refresh_every):
        pass
    return state.completion()


def chat_ids(model, text):
    return encode(model.tokenizer, [{"role": "user", "content": text}])


def job(model, prompt_ids, **params):
    """A job as the server makes it (text events), and the list its events go to."""
    events = []
    return text_job(model, list(prompt_ids), SamplingParams(**params), events.append), events


def text_of(events):
    assert not any(e.error for e in events), events
    return "".join(e.text for e in events)


def run_out(batcher, limit=5000):
    for _ in range(limit):
        if not batcher.rows:
            return
        batcher.step()
    raise AssertionError("the batch did not finish")


# ---------------------------------------------------------------------------- the batch engine

def test_requests_joining_a_running_batch_decode_exactly_as_alone(model):
    batcher = ContinuousBatcher(model, max_batch=4, initial_len=8)  # grows as it goes
    ids = {k: list(range(100 + 50 * i, 100 + 50 * i + n)) for i, (k, n) in enumerate(
        [("a", 5), ("b", 40), ("c", 12), ("d", 3)])}
    settings = {"a": dict(max_new_tokens=16, ignore_eos=True), "b": dict(max_new_tokens=4, ignore_eos=True),
                "c": dict(max_new_tokens=10, ignore_eos=True),
                "d": dict(max_new_tokens=8, ignore_eos=True, temperature=0.9, top_p=0.9, seed=7)}
    jobs = {k: job(model, ids[k], **settings[k]) for k in ids}

    assert batcher.admit(deque([jobs["a"][0]])) == 1 and batcher.column == 5
    for _ in range(3):
        batcher.step()
    batcher.admit(deque([jobs["b"][0]]))  # 40 prompt tokens > column 8: the live columns shift right
    assert batcher.column == 40 and [r.start for r in batcher.rows] == [32, 0]
    for _ in range(3):
        batcher.step()
    assert len(batcher.rows) == 1  # b is done; a's columns start at 32, 11 wide: a dead prefix
    waiting = deque([jobs["c"][0], jobs["d"][0]])
    assert batcher.admit(waiting) == 2 and not waiting
    assert batcher.column == 12 and batcher.rows[0].start == 1  # compacted left, room for c's 12 tokens
    for _ in range(2):
        batcher.step()
    jobs["c"][0].cancelled = True  # row 1 of 3: d moves into its place
    run_out(batcher)

    for k in "abd":
        assert text_of(jobs[k][1]) == alone(model, ids[k], SamplingParams(**settings[k])).text, k
    cancelled = text_of(jobs["c"][1])
    assert alone(model, ids["c"], SamplingParams(**settings["c"])).text.startswith(cancelled)
    assert all(e.finish_reason is None for e in jobs["c"][1])
    s = batcher.stats
    assert (s.completed, s.cancelled, s.failed, s.peak_rows, s.joined_running) == (3, 1, 0, 3, 3)


def test_the_compiled_batcher_decodes_as_the_eager_one(model):
    # 3 live rows, greedy and sampled side by side; on a CPU they run as 3 rows (no padding: the row count
    # is a symbolic size of the graph), and on a GPU as a bucket of 4.
    def run(compile):
        batcher = ContinuousBatcher(model, max_batch=4, compile=compile)
        settings = [dict(max_new_tokens=8, ignore_eos=True), dict(max_new_tokens=8, ignore_eos=True),
                    dict(max_new_tokens=8, ignore_eos=True, temperature=0.8, top_k=50, seed=3)]
        jobs = [job(model, chat_ids(model, f"prompt number {i}" + " more" * i), **p) for i, p in enumerate(settings)]
        batcher.admit(deque([j for j, _ in jobs]))
        assert batcher._bucket(len(batcher.rows)) == (4 if compile and model.device.type == "cuda" else 3)
        run_out(batcher)
        return [text_of(events) for _, events in jobs]

    compiled = run(compile=True)
    assert compiled == run(compile=False)
    assert len(set(compiled)) == 3


def test_warm_up_runs_every_sampling_kind_at_1_and_2_rows_and_leaves_the_batcher_empty(model):
    batcher = ContinuousBatcher(model, max_batch=5)
    warmed = batcher.warm_up()
    assert [(w.rows, w.kind) for w in warmed] == [(rows, kind) for rows in (1, 2)
                                                  for kind in ("greedy", "temperature", "filtered")]
    assert not batcher.rows and batcher.column == 0 and batcher.stats.steps == 0
    assert [row_bucket(n, 5) for n in range(1, 6)] == [1, 2, 4, 4, 5]
    ids = chat_ids(model, "after the warm-up")
    j, events = job(model, ids, max_new_tokens=6, ignore_eos=True)
    batcher.admit(deque([j]))
    run_out(batcher)
    assert text_of(events) == alone(model, ids, j.params).text


def test_refresh_in_a_running_batch_equals_refresh_alone(model):
    # With K=1 every token is re-processed by the full model right after it is written, so the
    # batch's global refresh schedule is the same as each request's own.
    batcher = ContinuousBatcher(model, max_batch=2, refresh_every=1)
    params = dict(max_new_tokens=8, ignore_eos=True)
    first, second = chat_ids(model, "refresh me"), chat_ids(model, "and me, a little later please")
    (a, a_events), (b, b_events) = job(model, first, **params), job(model, second, **params)
    batcher.admit(deque([a]))
    for _ in range(3):
        batcher.step()
    batcher.admit(deque([b]))
    run_out(batcher)
    assert text_of(a_events) == alone(model, first, a.params, refresh_every=1).text
    assert text_of(b_events) == alone(model, second, b.params, refresh_every=1).text
    assert text_of(a_events) != alone(model, first, a.params).text  # the refresh did something


def test_a_failing_request_leaves_the_others_alone(model):
    batcher = ContinuousBatcher(model, max_batch=4)
    good_ids = chat_ids(model, "keep going")
    good, good_events = job(model, good_ids, max_new_tokens=8, ignore_eos=True)
    batcher.admit(deque([good]))
    batcher.step()
    bad_token, bad_token_events = job(model, [5, len(model.tokenizer) + 10], max_new_tokens=5)  # prefill raises
    too_long, too_long_events = job(model, list(range(10, 10 + WINDOW)), max_new_tokens=5)
    after, after_events = job(model, chat_ids(model, "next in line"), max_new_tokens=4)
    waiting = deque([too_long, bad_token, after])
    batcher.admit(waiting)
    assert not waiting  # neither failure blocks the queue
    run_out(batcher)
    assert "context window" in too_long_events[-1].error and "prefill failed" in bad_token_events[-1].error
    assert text_of(good_events) == alone(model, good_ids, good.params).text
    assert text_of(after_events) == alone(model, after.prompt_ids, after.params).text
    assert batcher.stats.failed == 2 and batcher.stats.completed == 2


def test_a_sink_that_raises_cancels_only_its_row(model):
    batcher = ContinuousBatcher(model, max_batch=2)

    def gone(event):
        raise RuntimeError("event loop is closed")

    broken = text_job(model, chat_ids(model, "nobody listens"), SamplingParams(8, ignore_eos=True), gone)
    ok, ok_events = job(model, chat_ids(model, "somebody listens"), max_new_tokens=8, ignore_eos=True)
    batcher.admit(deque([broken, ok]))
    run_out(batcher)
    assert broken.cancelled and batcher.stats.cancelled == 1
    assert text_of(ok_events) == alone(model, ok.prompt_ids, ok.params).text


# ---------------------------------------------------------------------------- over HTTP

@contextmanager
def serving(app, drain_s=None, **server_options):
    """Run the app with uvicorn on 127.0.0.1 (a free port) in a background thread; with `drain_s`, the server of
    `overfill serve`, whose shutdown drains running requests (`server_options`: more of `uvicorn_server`'s)."""
    import uvicorn

    sock = listen_socket("127.0.0.1", 0)
    config = dict(log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(uvicorn.Config(app, **config)) if drain_s is None else \
        uvicorn_server(app, drain_s=drain_s, **{**config, "timeout_graceful_shutdown": TIMEOUT}, **server_options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


@pytest.fixture(scope="module")
def url(model):
    with serving(create_app(model, NAME, max_batch=4)) as base:
        yield base


@pytest.fixture
def fresh_url(model):
    """A server of its own, for tests that read its counters."""
    with serving(create_app(model, NAME, max_batch=4)) as base:
        yield base


def client_for(base, api_key="unused"):
    return openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def client(url):
    return client_for(url)


def health(url):
    return httpx.get(url + "/health", timeout=TIMEOUT).json()


def wait_until(condition, seconds=TIMEOUT):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def chat(text):
    return [{"role": "user", "content": text}]


def test_chat_completions_match_generation_streaming_and_not(model, client):
    messages = chat("Tell me about two-stage decoding")
    ids = encode(model.tokenizer, messages)
    reference = alone(model, ids, SamplingParams(24))

    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion" and reply.model == NAME
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == reference.text
    assert reply.choices[0].finish_reason == reference.finish_reason
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        len(ids), 24, len(ids) + 24)

    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reference.finish_reason
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 24
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_text_completions_match_generation_streaming_and_not(model, client):
    prompt = "The capital of France is"
    ids = encode(model.tokenizer, prompt, chat=False)
    reference = alone(model, ids, SamplingParams(10))
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == reference.text
    assert reply.usage.prompt_tokens == len(ids)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True)]
    assert "".join(pieces) == reference.text
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == reference.text
    default = client.completions.create(model=NAME, prompt=prompt, temperature=0)  # OpenAI's default: 16 tokens
    assert default.usage.completion_tokens == 16


def test_stream_wire_format(url):
    body = {"model": NAME, "messages": chat("hi"), "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final = payloads[-2]["choices"][0]
    assert final["delta"] == {} and final["finish_reason"] == "length"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 5
    assert all(p["usage"] is None for p in payloads[:-1])


def test_concurrent_requests_share_the_batch_and_keep_their_own_settings(model, fresh_url):
    url, client = fresh_url, client_for(fresh_url)
    settings = [dict(max_tokens=5 + 3 * i, temperature=0) for i in range(4)] + [
        dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=i) for i in range(4)]
    prompts = [chat(f"request number {i}: " + "tell me more " * i) for i in range(8)]

    def ask(i):
        return client.chat.completions.create(model=NAME, messages=prompts[i], **settings[i])

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    for i, reply in enumerate(replies):
        s = settings[i]
        params = SamplingParams(s["max_tokens"], s["temperature"], top_p=s.get("top_p", 1.0), seed=s.get("seed"))
        assert reply.choices[0].message.content == alone(model, encode(model.tokenizer, prompts[i]), params).text, i
    stats = health(url)
    assert stats["completed"] == 8 and stats["active"] == 0 and stats["queued"] == 0
    assert 2 <= stats["peak_rows"] <= 4 and stats["mean_batch"] > 1  # batched, within --max-batch


def test_stop_strings(model, client):
    messages = chat("count with me")
    full = alone(model, encode(model.tokenizer, messages), SamplingParams(30)).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=30, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


BAD_REQUESTS = [
    # (endpoint, body or raw bytes, status, param, words in the message)
    ("chat/completions", b'{"model": "tiny-overfill", "messages": [', 400, None, "not valid JSON"),
    ("chat/completions", {"model": "gpt-5", "messages": chat("hi")}, 404, "model", "does not exist"),
    ("chat/completions", {"model": NAME}, 400, "messages", "Missing required parameter"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages", "at least 1"),
    ("chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", ""),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "max_tokens": -3}, 400, "max_tokens", ""),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "max_tokens": 10**9}, 400, "max_tokens",
     "maximum context length"),
    ("chat/completions", {"model": NAME, "messages": chat("word " * 3000)}, 400, "messages", "maximum context length"),
    ("completions", {"model": NAME, "prompt": "word " * 3000}, 400, "prompt", "maximum context length"),
    ("completions", {"model": NAME, "prompt": [1, 10**7]}, 400, "prompt", "token-id prompt"),
    ("completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "n": 2}, 400, "n", "not supported"),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "logprobs": True}, 400, "logprobs", "not supported"),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "tools": [{"type": "function"}]}, 400, "tools",
     "not supported"),
    ("completions", {"model": NAME, "prompt": "hi", "echo": True}, 400, "echo", "not supported"),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "frobnicate": 1}, 400, "frobnicate", "Unrecognized"),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "temperature": 5}, 400, "temperature", ""),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ""),
    ("chat/completions", {"model": NAME, "messages": chat("hi"), "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only allowed"),
    ("chat/completions", [1, 2], 400, None, "Invalid value"),
    ("nowhere", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("endpoint,body,status,param,words", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(url, client, endpoint, body, status, param,
                                                                     words):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = httpx.post(f"{url}/v1/{endpoint}", timeout=TIMEOUT, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"]
    ok = client.chat.completions.create(model=NAME, messages=chat("still there?"), max_tokens=3)
    assert ok.usage.completion_tokens == 3


def test_the_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=chat("hi"))
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.chat.completions.create(model=NAME, messages=chat("hi"), n=3)


def test_models_and_health(url, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).owned_by == "overfill"
    stats = health(url)
    assert stats["status"] == "ok" and stats["model"] == NAME and stats["max_batch"] == 4


def test_a_client_that_disconnects_mid_stream_frees_its_row(model, fresh_url):
    url = fresh_url
    body = {"model": NAME, "messages": chat("go on forever"), "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        assert all(next(lines) is not None for _ in range(6))
        assert health(url)["active"] == 1
        other = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT, json={
            "model": NAME, "messages": chat("meanwhile"), "max_tokens": 8, "temperature": 0}).json()
    # leaving the block closed the connection mid-stream
    wait_until(lambda: health(url)["active"] == 0)
    stats = health(url)
    assert stats["cancelled"] == 1 and stats["completed"] == 1 and stats["generated_tokens"] < 1900
    assert other["choices"][0]["message"]["content"] == alone(
        model, encode(model.tokenizer, chat("meanwhile")), SamplingParams(8)).text


def test_a_client_that_gives_up_on_a_whole_response_frees_its_row(fresh_url):
    url = fresh_url
    body = {"model": NAME, "messages": chat("take your time"), "max_tokens": 1900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
    wait_until(lambda: health(url)["cancelled"] == 1)
    assert health(url)["active"] == 0


def test_api_key(model):
    with serving(create_app(model, NAME, api_key="sekret")) as base:
        with pytest.raises(openai.AuthenticationError):
            client_for(base, api_key="wrong").models.list()
        response = httpx.post(base + "/v1/chat/completions", json={"model": NAME, "messages": chat("hi")})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        good = client_for(base, api_key="sekret")
        assert good.chat.completions.create(model=NAME, messages=chat("hi"), max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(base + "/health").status_code == 200  # probes need no key


def test_a_taken_port_and_bad_flags_are_clear_errors():
    with listen_socket("127.0.0.1", 0) as taken:
        taken.listen()
        with pytest.raises(OverfillError, match="cannot listen on 127.0.0.1"):
            listen_socket("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(OverfillError, match="max-batch"):
        serve_command(ServeArgs(max_batch=0))
