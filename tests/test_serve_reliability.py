"""Server reliability (issue #14): a huge request does not stall anyone else, requests without
`max_tokens` are batched, malformed input gets OpenAI errors, the docs need the API key, a
shutdown ends every stream with [DONE], and no stray U+FFFD ends a text cut at the token limit.
Same tiny random pair and real uvicorn server as test_serve.py.
"""
import json
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from overfill.generate import SamplingParams, TextState, encode
from overfill.engine import ContinuousBatcher
from overfill.serve import DEFAULT_MAX_BODY_BYTES, APIError, PromptEncoder, create_app
from test_serve import (NAME, TIMEOUT, WINDOW, alone, chat, chat_ids, client_for, health, job, model,  # noqa: F401
                        run_out, serving, text_of, tiny_pair, wait_until)

SMALL_WINDOW = 192
JSON = {"content-type": "application/json"}
STALL_S = 2.0
"""Generous: before the fix a 10 MB body stalled everyone for 15 s."""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The pair with a short context window, so that requests without max_tokens end soon."""
    return tiny_pair(tmp_path_factory, window=SMALL_WINDOW)


def post(url, endpoint, body, **kwargs):
    """POST a dict as ASCII JSON (lone surrogates escaped, as a client may send them) or raw bytes."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/{endpoint}", content=content, headers=JSON, timeout=TIMEOUT, **kwargs)


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---------------------------------------------------------------------------- 1: huge requests

def test_a_body_over_the_limit_gets_a_413_in_openai_format(model):
    limit = 64 << 10
    big = json.dumps({"model": NAME, "messages": chat("x" * 2 * limit)}).encode()
    with serving(create_app(model, NAME, max_body_bytes=limit)) as url:
        declared = post(url, "chat/completions", big)
        chunked = httpx.post(url + "/v1/chat/completions", headers=JSON, timeout=TIMEOUT,
                             content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]))
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        for response in (declared, chunked):
            error = assert_openai_error(response, 413)
            assert error["code"] == "request_too_large" and str(limit) in error["message"]
        fits = post(url, "chat/completions", {"model": NAME, "messages": HI, "max_tokens": 2})
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 2


def test_huge_requests_stall_neither_health_nor_a_running_stream(model):
    max_chars = PromptEncoder(model.tokenizer, WINDOW).max_chars
    texts = [  # each is refused fast, and nobody else waits for it
        "word " * 2_000_000,  # 10 MB: over the body limit, refused from its Content-Length
        "w" * (DEFAULT_MAX_BODY_BYTES - 200),  # under the limit, over the character bound
        "word " * (max_chars // 5 - 100),  # under both: tokenized (in a worker thread), too many tokens
    ]
    bodies = [json.dumps({"model": NAME, "messages": chat(text)}).encode() for text in texts]
    gaps, stop = [], threading.Event()

    def stream():
        body = {"model": NAME, "messages": chat("keep talking"), "max_tokens": 1900, "temperature": 0, "stream": True}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
            last = time.monotonic()
            for line in response.iter_lines():
                if line:
                    gaps.append(time.monotonic() - last)
                    last = time.monotonic()
                if stop.is_set():
                    return

    with serving(create_app(model, NAME)) as base:
        reader = threading.Thread(target=stream)
        reader.start()
        wait_until(lambda: len(gaps) >= 5)
        del gaps[:]
        slowest_health, statuses = 0.0, []
        for body in bodies:
            sender = threading.Thread(target=lambda b=body: statuses.append(post(base, "chat/completions", b)))
            sender.start()
            while sender.is_alive():
                start = time.monotonic()
                assert health(base)["status"] == "ok"
                slowest_health = max(slowest_health, time.monotonic() - start)
            sender.join()
        streamed = len(gaps)
        stop.set()
        reader.join(TIMEOUT)
    assert [r.status_code for r in statuses] == [413, 400, 400]
    assert all(r.json()["error"]["code"] in ("request_too_large", "context_length_exceeded") for r in statuses)
    assert slowest_health < STALL_S
    assert streamed and max(gaps[:streamed]) < STALL_S


def test_the_character_bound_is_sound_and_comes_before_tokenizing(model):
    tokenizer = model.tokenizer
    encoder = PromptEncoder(tokenizer, WINDOW)
    longest = max(len(text) for text in tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))
    assert encoder.max_chars >= WINDOW * longest  # no token covers more characters: the bound never refuses a fit

    class NoTokenizing:
        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized")

        def apply_chat_template(self, *args, **kwargs):
            return tokenizer.apply_chat_template(*args, **kwargs)

    encoder.tokenizer = NoTokenizing()
    too_long = "x" * (encoder.max_chars + 1)
    for call, arg in ((encoder._chat, [{"role": "user", "content": too_long}]), (encoder._text, too_long)):
        with pytest.raises(APIError) as refused:
            call(arg)
        assert refused.value.code == "context_length_exceeded"


def test_the_normalizer_bounds_the_characters_per_token():
    shrink = PromptEncoder._shrink
    llama = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                 {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    assert shrink(None) == 1 and shrink(llama) == 1 and shrink({"type": "NFC"}) == 4
    assert shrink({"type": "Strip", "strip_left": True, "strip_right": True}) is None  # "   " -> "": no bound
    assert shrink({"type": "Replace", "pattern": {"Regex": " +"}, "content": " "}) is None


# ---------------------------------------------------------------------------- 2: no max_tokens

def unbounded_job(model, text):
    """A job as the server makes it for a chat request without max_tokens: the rest of the window."""
    ids = chat_ids(model, text)
    return job(model, ids, max_new_tokens=model.context_window - len(ids))


def test_requests_without_max_tokens_are_admitted_together_and_decode_as_alone(small):
    batcher = ContinuousBatcher(small, max_batch=8, initial_len=16)
    jobs = [unbounded_job(small, f"question {i}: " + "why " * i) for i in range(8)]
    assert batcher.admit(deque(j for j, _ in jobs)) == 8
    run_out(batcher)
    assert batcher.stats.peak_rows == 8 and batcher.stats.row_steps / batcher.stats.steps > 4
    for j, events in jobs:
        assert text_of(events) == alone(small, j.prompt_ids, j.params).text


def test_a_young_row_goes_on_past_the_window_end_where_an_old_one_began(small):
    batcher = ContinuousBatcher(small, max_batch=2)
    old_ids, young_ids = chat_ids(small, "old"), chat_ids(small, "young")
    old, old_events = job(small, old_ids, max_new_tokens=60, ignore_eos=True)
    young, young_events = job(small, young_ids, max_new_tokens=SMALL_WINDOW - len(young_ids), ignore_eos=True)
    batcher.admit(deque([old]))
    for _ in range(40):
        batcher.step()
    assert batcher.admit(deque([young])) == 1  # it used to wait for `old`: together they span more than the window
    columns = []
    while batcher.rows:
        columns.append(batcher.column)
        batcher.step()
    end = columns.index(SMALL_WINDOW)
    assert 0 < columns[end + 1] < SMALL_WINDOW  # the live columns moved back to column 0
    assert text_of(old_events) == alone(small, old_ids, old.params).text
    assert text_of(young_events) == alone(small, young_ids, young.params).text


def test_concurrent_requests_without_max_tokens_share_the_batch(small):
    prompts = [chat(f"tell me about number {i}" + " and more" * i) for i in range(12)]
    with serving(create_app(small, NAME, max_batch=8)) as url:
        client = client_for(url)
        with ThreadPoolExecutor(len(prompts)) as pool:
            replies = list(pool.map(lambda m: client.chat.completions.create(model=NAME, messages=m, temperature=0),
                                    prompts))
        stats = health(url)
    assert stats["completed"] == 12 and stats["peak_rows"] >= 6 and stats["mean_batch"] >= 4, stats
    for messages, reply in zip(prompts, replies):
        ids = encode(small.tokenizer, messages)
        expected = alone(small, ids, SamplingParams(SMALL_WINDOW - len(ids)))
        assert reply.choices[0].message.content == expected.text
        assert reply.choices[0].finish_reason == expected.finish_reason


# ---------------------------------------------------------------------------- 3: malformed input

SURROGATE = "\ud800"
HI = chat("hi")
RAW_HI = json.dumps({"model": NAME, "messages": HI}).encode()[:-1]  # open, for numbers as a client may write them
MALFORMED = [
    ("chat/completions", {"model": NAME, "messages": chat("a" + SURROGATE)}),
    ("chat/completions", {"model": NAME + SURROGATE, "messages": HI}),
    ("chat/completions", {"model": NAME, "messages": HI, "stop": [SURROGATE]}),
    ("chat/completions", {"model": NAME, "messages": HI, SURROGATE: 1}),
    ("completions", {"model": NAME, "prompt": SURROGATE + "hi"}),
    ("chat/completions", b"this is not json"),
    ("chat/completions", b""),
    ("chat/completions", b'{"model": "\xff\xfe"}'),  # not UTF-8
    ("chat/completions", b"[" * 100_000),  # nested deeper than any parser goes
    ("chat/completions", [{"model": NAME, "messages": HI}]),
    ("chat/completions", "a string"),
    ("chat/completions", 42),
    ("chat/completions", {"model": 7, "messages": HI}),
    ("chat/completions", {"model": NAME, "messages": "hi"}),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": 5}]}),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user"}]}),
    ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("chat/completions", {"model": NAME, "messages": HI, "max_tokens": "ten"}),
    ("chat/completions", {"model": NAME, "messages": HI, "max_tokens": -1}),
    ("chat/completions", {"model": NAME, "messages": HI, "max_tokens": 0}),
    ("chat/completions", {"model": NAME, "messages": HI, "max_tokens": 10**30}),
    ("chat/completions", RAW_HI + b', "max_tokens": 1e400}'),
    ("chat/completions", {"model": NAME, "messages": HI, "n": 10**30}),
    ("chat/completions", {"model": NAME, "messages": HI, "n": -1}),
    ("chat/completions", {"model": NAME, "messages": HI, "temperature": "hot"}),
    ("chat/completions", RAW_HI + b', "temperature": NaN}'),
    ("chat/completions", {"model": NAME, "messages": HI, "top_p": 0}),
    ("chat/completions", {"model": NAME, "messages": HI, "top_k": -5}),
    ("chat/completions", {"model": NAME, "messages": HI, "temperature": 1, "top_k": 2**63}),  # beyond an int64
    ("completions", {"model": NAME, "prompt": "hi", "top_k": 10**30}),
    ("chat/completions", {"model": NAME, "messages": HI, "seed": 2**64}),
    ("chat/completions", {"model": NAME, "messages": HI, "stop": 5}),
    ("chat/completions", {"model": NAME, "messages": HI, "stream": "maybe"}),
    ("chat/completions", {"model": NAME, "messages": HI, "stream": True, "stream_options": {"x": 1}}),
    ("chat/completions", {"model": NAME, "messages": HI, "logit_bias": {"1": 100}}),
    ("completions", {"model": NAME, "prompt": [-1]}),
    ("completions", {"model": NAME, "prompt": []}),
    ("completions", {"model": NAME, "prompt": [""]}),
    ("completions", {"model": NAME, "prompt": "   "}),
    ("completions", {"model": NAME, "prompt": [1.5]}),
    ("completions", {"model": NAME, "prompt": {"text": "hi"}}),
]


@pytest.fixture(scope="module")
def url(model):
    with serving(create_app(model, NAME, max_batch=4)) as base:
        yield base


@pytest.mark.parametrize("endpoint,body", MALFORMED, ids=[f"{i}-{e}" for i, (e, _) in enumerate(MALFORMED)])
def test_malformed_requests_get_4xx_openai_errors(url, endpoint, body):
    response = post(url, endpoint, body)
    assert 400 <= response.status_code < 500
    assert assert_openai_error(response, response.status_code)["type"] == "invalid_request_error"


def test_a_lone_surrogate_is_named_and_the_server_goes_on(url):
    error = assert_openai_error(post(url, "chat/completions", {"model": NAME, "messages": chat(SURROGATE)}), 400)
    assert "surrogate" in error["message"]
    ok = post(url, "chat/completions", {"model": NAME, "messages": HI, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_server_bug_still_answers_in_openai_format(model):
    app = create_app(model, NAME)

    def broken(messages):
        raise RuntimeError("a bug")

    app.state.server.prompts._chat = broken
    with serving(app) as base:
        error = assert_openai_error(post(base, "chat/completions", {"model": NAME, "messages": HI}), 500)
        assert error["type"] == "server_error"


# ---------------------------------------------------------------------------- 4: docs, shutdown, U+FFFD

def test_docs_and_schema_need_the_key_when_one_is_set(model):
    key = {"Authorization": "Bearer sekret"}
    with serving(create_app(model, NAME, api_key="sekret")) as base:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
            assert_openai_error(httpx.get(base + path, timeout=TIMEOUT), 401)
            assert httpx.get(base + path, headers=key, timeout=TIMEOUT).status_code == 404  # and off
        assert httpx.get(base + "/health", timeout=TIMEOUT).status_code == 200
    with serving(create_app(model, NAME)) as base:
        assert httpx.get(base + "/openapi.json", timeout=TIMEOUT).status_code == 200


def read_stream(url, body, into: list, running: threading.Event):
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        for line in response.iter_lines():
            if line:
                into.append(line.removeprefix("data: "))
            if len(into) >= 3:  # the role chunk and text: the request holds a row
                running.set()


def stream_through_shutdown(model, drain_s, max_tokens):
    """Start a stream, shut the server down while it runs, and return what the client read."""
    events, running = [], threading.Event()
    body = {"model": NAME, "messages": chat("talk through the shutdown"), "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    with serving(create_app(model, NAME), drain_s=drain_s) as base:
        reader = threading.Thread(target=read_stream, args=(base, body, events, running))
        reader.start()
        assert running.wait(TIMEOUT)
    reader.join(TIMEOUT)  # leaving `serving` shut the server down, as SIGTERM does
    assert not reader.is_alive()
    return events


def test_shutdown_ends_a_running_stream_with_an_error_event_and_done(model):
    events = stream_through_shutdown(model, drain_s=0, max_tokens=1900)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]


def test_shutdown_lets_a_running_stream_finish_within_the_drain(model):
    events = stream_through_shutdown(model, drain_s=TIMEOUT, max_tokens=20)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    ids = encode(model.tokenizer, chat("talk through the shutdown"))
    assert text == alone(model, ids, SamplingParams(20)).text


def byte_tokens(tokenizer, text):
    """The ids of the single-byte tokens of `text`'s UTF-8 bytes (GPT-2 byte-level vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}
    return tokenizer.convert_tokens_to_ids([char[b] for b in text.encode()])


@pytest.mark.parametrize("end", ["length", "eos"])
def test_a_text_cut_inside_a_character_ends_without_u_fffd(model, end):
    tokenizer = model.tokenizer
    euro = byte_tokens(tokenizer, "\u20ac")  # 3 bytes, 3 tokens
    assert tokenizer.decode(euro) == "\u20ac" and set(tokenizer.decode(euro[:2])) == {"\ufffd"}
    ids = tokenizer.encode("Price: 5", add_special_tokens=False) + euro[:2]
    eos = tokenizer.eos_token_id
    fed = ids + [eos] if end == "eos" else ids
    state = TextState(tokenizer, SamplingParams(), len(ids) if end == "length" else 99, {eos}, 1)
    pieces = [state.add(t) for t in fed]
    assert state.done and state.finish_reason == ("length" if end == "length" else "stop")
    assert "".join(pieces) == state.text == state.completion().text == "Price: 5"

    whole = TextState(tokenizer, SamplingParams(), len(ids) + 1, {eos}, 1)
    assert "".join(whole.add(t) for t in ids + euro[2:]) == "Price: 5\u20ac"  # a completed character stays


# ---------------------------------------------------------------------------- half-open connections

def raw_connection(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    return conn


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server closes `conn` (EOF, or a reset) within `seconds`, reading whatever it answers."""
    conn.settimeout(seconds)
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def read_until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends before it closes `conn` (an answer with `connection: close`)."""
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"],
                         ids=["silent", "half-a-head"])
def test_a_connection_without_a_whole_request_head_is_closed(model, sent):
    with serving(create_app(model, NAME), drain_s=1.0, head_timeout_s=0.5) as base:
        conn = raw_connection(base)
        conn.sendall(sent)
        started = time.monotonic()
        assert closed_within(conn, 5.0)
        assert 0.4 < time.monotonic() - started < 3.0
        conn.close()
        ok = post(base, "chat/completions", {"model": NAME, "messages": HI, "max_tokens": 2})  # others unharmed
        assert ok.status_code == 200


def test_the_head_timeout_spares_a_request_whose_head_arrived(model):
    body = json.dumps({"model": NAME, "messages": HI, "max_tokens": 2}).encode()
    with serving(create_app(model, NAME), drain_s=1.0, head_timeout_s=0.3) as base:
        conn = raw_connection(base)
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.8)  # the body comes late, but within the body timeout
        conn.sendall(body)
        conn.settimeout(TIMEOUT)
        answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        conn.close()


def test_a_body_that_stops_half_way_gets_a_408(model):
    with serving(create_app(model, NAME, body_timeout_s=0.5), drain_s=1.0) as base:
        conn = raw_connection(base)
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\"")
        conn.settimeout(5.0)
        answer = read_until_closed(conn)  # the head and the body may come in separate segments
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
        conn.close()


def test_ignore_eos_reaches_the_sampling_parameters(model):
    from overfill.serve import ChatRequest

    server = create_app(model, NAME).state.server
    for ignore in (True, False):
        body = ChatRequest(model=NAME, messages=HI, max_tokens=4, ignore_eos=ignore)
        assert server._params(body, 3, body.max_tokens, 16, "messages").ignore_eos is ignore
