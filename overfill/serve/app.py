"""The app: a scheduler thread that runs the engine's `ContinuousBatcher`, and the OpenAI endpoints
that turn each request into a job and its token events into text.

    POST /v1/chat/completions   messages through the model's chat template; streaming or not
    POST /v1/completions        raw text (or token ids); streaming or not
    GET  /v1/models             the one served model
    GET  /health                liveness and the scheduler's counters (no API key needed)

How requests share the batch is the batcher's (overfill/engine/continuous.py). The event loop only
parses and answers: a body over `max_body_bytes` gets a 413 before it is read, prompts are
templated and tokenized in worker threads, and a text too long for the window by its character
count alone is refused before it is tokenized (`PromptEncoder`). On shutdown, running requests get
`SHUTDOWN_DRAIN_S` to finish, then an error event and [DONE].
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import ContinuousBatcher, Job, SamplingParams, TokenEvent
from ..errors import OverfillError
from ..generate import TextState
from ..two_stage import TwoStageModel
from .http import BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, _BodyLimit, _Gate, _validation_error
from .protocol import APIError, ChatRequest, CompletionRequest, PromptEncoder, Reply, _GenerationRequest, _sse

log = logging.getLogger("overfill.serve")

DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks whether its client is still there."""
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default `max_tokens` for /v1/completions (chat defaults to the rest of the context)."""
SHUTTING_DOWN = "the server is shutting down"

# ---------------------------------------------------------------------------- the batch

@dataclass(frozen=True)
class Event:
    """What a request hears: text pieces, then one event with `finish_reason` or `error`."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


def text_job(model: TwoStageModel, prompt_ids: list[int], params: SamplingParams,
             sink: Callable[[Event], None]) -> Job:
    """An engine job whose tokens reach `sink` as text: detokenised as they come, cut at stop strings."""
    state = TextState(model.tokenizer, params, params.max_new_tokens, model.eos_token_ids, len(prompt_ids))

    def on_token(event: TokenEvent) -> bool:
        if event.error:
            sink(Event(error=event.error))
            return True
        piece = state.add(event.token) if event.token is not None else ""
        if event.finish_reason and not state.done:
            piece += state.end(event.finish_reason)
        if piece or state.done:
            sink(Event(piece, state.finish_reason, event.generated))
        return state.done

    return Job(list(prompt_ids), params, on_token)


class Scheduler:
    """Runs a ContinuousBatcher on one background thread; `submit` may be called from any thread."""

    def __init__(self, batcher: ContinuousBatcher):
        self.batcher = batcher
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()
        self._stopping = threading.Event()
        self.drain_deadline: float | None = None
        """Set on shutdown: at this `time.monotonic()`, the requests not done yet end with an error."""
        self._thread = threading.Thread(target=self._run, name="overfill-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)

    def drain(self, seconds: float) -> None:
        """Let the requests already here finish for up to `seconds`, then end them (and any later one) with an
        error. The HTTP server stops taking new ones first."""
        self.drain_deadline = time.monotonic() + seconds

    def submit(self, job: Job) -> None:
        self.batcher.stats.requests += 1
        self.inbox.put(job)

    @property
    def queued(self) -> int:
        return len(self.waiting) + self.inbox.qsize()

    def _run(self) -> None:
        batcher = self.batcher
        while not self._stopping.is_set():
            try:
                self._collect(block=not batcher.rows and not self.waiting)
                batcher.retire()
                if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
                    self._end_all(SHUTTING_DOWN)
                batcher.admit(self.waiting)
                if batcher.rows:
                    batcher.step()
            except Exception as e:  # a bug must not take the server down: fail what is running, go on
                log.exception("scheduler error")
                batcher.fail_all(f"internal error: {e}")
        self._collect(block=False)
        self._end_all(SHUTTING_DOWN)

    def _end_all(self, message: str) -> None:
        while self.waiting:
            self.batcher.fail_job(self.waiting.popleft(), message)
        self.batcher.fail_all(message)

    def _collect(self, block: bool) -> None:
        try:
            if block:
                self.waiting.append(self.inbox.get(timeout=0.05))
            while True:
                self.waiting.append(self.inbox.get_nowait())
        except queue.Empty:
            pass


class OpenAIServer:
    """The endpoints: validation, tokenisation, and turning a job's events into OpenAI responses."""

    def __init__(self, model: TwoStageModel, model_name: str, scheduler: Scheduler):
        self.model, self.model_name, self.scheduler = model, model_name, scheduler
        self.prompts = PromptEncoder(model.tokenizer, model.context_window)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "overfill"}

    async def list_models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    async def get_model(self, model: str) -> dict:
        self._check_model(model)
        return self.model_card()

    async def health(self) -> dict:
        batcher = self.scheduler.batcher
        stats = asdict(batcher.stats)
        return {"status": "ok", "model": self.model_name, "max_batch": batcher.max_batch,
                "active": len(batcher.rows), "queued": self.scheduler.queued,
                "mean_batch": stats["row_steps"] / max(stats["steps"], 1), **stats}

    async def chat_completions(self, body: ChatRequest, request: Request):
        self._check(body)
        prompt_ids = await self.prompts.chat([m.as_template_input() for m in body.messages])
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._respond(request, body, prompt_ids, max_tokens, self.model.context_window, chat=True)

    async def completions(self, body: CompletionRequest, request: Request):
        self._check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported (send several requests)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await self.prompts.text(prompt)
        else:
            prompt_ids = self._check_token_ids(prompt)
        return await self._respond(request, body, prompt_ids, body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                                   chat=False)

    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model '{name}' does not exist: this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check(self, body: _GenerationRequest) -> None:
        self._check_model(body.model)
        body.reject_unsupported()

    def _check_token_ids(self, ids: list[int]) -> list[int]:
        vocab = self.model.full.args.vocab_size
        if len(ids) >= self.model.context_window:
            return ids  # refused by `_params`, without scanning all of them here
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"a token-id prompt must be a non-empty list of ids in [0, {vocab})", param="prompt")
        return ids

    def _params(self, body: _GenerationRequest, prompt_len: int, max_tokens: int | None, default_max: int,
                prompt_param: str) -> SamplingParams:
        window = self.model.context_window
        if prompt_len >= window:
            raise APIError(400, f"This model's maximum context length is {window} tokens, but the prompt has "
                                f"{prompt_len} tokens. Please shorten the prompt.", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max, window - prompt_len)
        if prompt_len + max_tokens > window:
            raise APIError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for "
                                f"the completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        params = SamplingParams(max_tokens, temperature, body.top_k or 0, body.top_p or 1.0, body.seed,
                                body.stop_strings(), ignore_eos=bool(body.ignore_eos))
        try:
            return params.validate()
        except OverfillError as e:
            raise APIError(400, str(e)) from None

    async def _respond(self, request: Request, body: _GenerationRequest, prompt_ids: list[int],
                       max_tokens: int | None, default_max: int, chat: bool) -> Response:
        params = self._params(body, len(prompt_ids), max_tokens, default_max, "messages" if chat else "prompt")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = text_job(self.model, prompt_ids, params, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        reply = Reply(chat, self.model_name, len(prompt_ids), include_usage)
        self.scheduler.submit(job)
        if body.stream:
            return StreamingResponse(self._stream(job, events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            pieces: list[str] = []
            async for event in _events_while_connected(events, request):
                if event.error:
                    reply.log("error", 0)
                    raise APIError(500, event.error, type="server_error")
                if event.text:
                    reply.saw_text()
                pieces.append(event.text)
                if event.finish_reason:
                    reply.log(event.finish_reason, event.completion_tokens)
                    return JSONResponse(reply.whole("".join(pieces), event.finish_reason, event.completion_tokens))
            reply.log("disconnected", 0)
            return Response(status_code=499)  # nobody is there to read it
        finally:
            job.cancelled = True  # no-op once finished; otherwise frees the row

    async def _stream(self, job: Job, events: asyncio.Queue, reply: Reply) -> AsyncIterator[str]:
        outcome, tokens = "disconnected", 0
        try:
            if reply.chat:
                yield _sse(reply.chunk(text="", role=True))
            while True:
                event: Event = await events.get()
                if event.error:  # e.g. shutdown: the client still learns that the stream is over
                    outcome = "error"
                    yield _sse(APIError(500, event.error, type="server_error").body())
                    yield "data: [DONE]\n\n"
                    return
                if event.text:
                    reply.saw_text()
                    yield _sse(reply.chunk(text=event.text))
                if event.finish_reason:
                    outcome, tokens = event.finish_reason, event.completion_tokens
                    yield _sse(reply.chunk(finish_reason=event.finish_reason))
                    if reply.include_usage:
                        yield _sse(reply.usage_chunk(event.completion_tokens))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # also when the client disconnects: the cancelled stream stops its row
            job.cancelled = True
            reply.log(outcome, tokens)


def create_app(model: TwoStageModel, model_name: str = "overfill", api_key: str | None = None,
               max_batch: int = 16, refresh_every: int | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S, compile: bool = False):
    """The FastAPI app; its lifespan starts and stops the scheduler thread that owns the model.

    With an API key, the interactive docs are off: a browser cannot send the key, and the
    schema needs no publishing then."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    scheduler = Scheduler(ContinuousBatcher(model, max_batch, refresh_every, compile=compile))
    server = OpenAIServer(model, model_name, scheduler)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None} if api_key else {}
    app = FastAPI(title="overfill", lifespan=lifespan, **docs)
    app.state.server = server
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(_Gate, api_key=api_key)  # the outermost: no body is read before the key is checked
    app.get("/health")(server.health)
    app.get("/v1/models")(server.list_models)
    app.get("/v1/models/{model}")(server.get_model)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/completions")(server.completions)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(error.errors()[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:  # a bug: still OpenAI's format
        return await api_error(request, APIError(500, f"internal error: {type(error).__name__}", type="server_error"))

    return app


async def _events_while_connected(events: asyncio.Queue, request: Request) -> AsyncIterator[Event]:
    """A job's events up to its last one; they stop early once the client has gone away."""
    checked = time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            event = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:  # even while tokens keep coming
            if await request.is_disconnected():
                return
            checked = time.monotonic()
        if event is not None:
            yield event
            if event.error or event.finish_reason:
                return
