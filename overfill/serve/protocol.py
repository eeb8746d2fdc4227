"""The OpenAI wire format: request bodies (validated as OpenAI does), replies and stream chunks, and the
prompt encoder that tokenizes off the event loop."""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import operator
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import OverfillError
from ..generate import encode

log = logging.getLogger("overfill.serve")

class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _has_lone_surrogate(data: Any) -> bool:
    """Whether a string (or key) anywhere in parsed JSON holds a lone surrogate; iterative, for deep nesting."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return False


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields shared by both endpoints, with OpenAI's names, defaults and ranges."""

    model_config = ConfigDict(extra="forbid")
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "n": (1, None), "presence_penalty": (0, None), "frequency_penalty": (0, None), "logit_bias": (None, {})}
    """Parameters accepted only at these values (anything else is unsupported)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # an extension, as in vLLM
    ignore_eos: bool | None = False  # an extension, as in vLLM: generate max_tokens whatever the model says
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = 1
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None

    def reject_unsupported(self) -> None:
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value not in neutral:
                raise APIError(400, f"'{name}': {json.dumps(value)} is not supported by this server",
                               param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        if _has_lone_surrogate(data):  # JSON allows "\ud800"; neither the tokenizer nor a UTF-8 reply can take it
            raise ValueError("the request holds a lone UTF-16 surrogate, which is not valid Unicode")
        return data

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        return stop


class CompletionRequest(_GenerationRequest):
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **_GenerationRequest.NEUTRAL, "logprobs": (None,), "echo": (False, None), "best_of": (None, 1),
        "suffix": (None, "")}

    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_GenerationRequest):
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **_GenerationRequest.NEUTRAL, "logprobs": (None, False), "top_logprobs": (None,),
        "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
        "function_call": (None, "none"), "response_format": (None, {"type": "text"})}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None


@dataclass
class Reply:
    """The OpenAI JSON objects of one response (chat or text completion) and its log line."""

    chat: bool
    model: str
    prompt_tokens: int
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    first_text_at: float | None = None

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _object(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if self.chat else \
            {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        kind = "chat.completion" if self.chat else "text_completion"
        return self._object(kind, [choice], usage=self.usage(completion_tokens))

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            delta.update({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        extra = {"usage": None} if self.include_usage else {}
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra)

    def usage_chunk(self, completion_tokens: int) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                            usage=self.usage(completion_tokens))

    def saw_text(self) -> None:
        self.first_text_at = self.first_text_at or time.perf_counter()

    def log(self, outcome: str, completion_tokens: int) -> None:
        now = time.perf_counter()
        ttft = (self.first_text_at or now) - self.started
        log.info("%s %s prompt=%d completion=%d ttft=%.0fms total=%.0fms", self.id, outcome, self.prompt_tokens,
                 completion_tokens, ttft * 1e3, (now - self.started) * 1e3)


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class PromptEncoder:
    """Prompt text to token ids, in a worker thread, refusing a text that surely exceeds the context window
    before tokenizing it.

    One token stands for at most `longest` characters of normalized text: the longest vocabulary
    entry or added token (for byte-level BPE an entry's length counts bytes, which over-counts
    characters). So a text of more than `window * longest * shrink` characters has more than
    `window` tokens, where `shrink` bounds how much the tokenizer's normalizer can shorten a
    text: 1 for none, 4 for NFC/NFKC (which compose at most 4 code points into one). With a
    normalizer that can shorten text without bound there is no such limit, and the body-size
    limit bounds the tokenizer's work instead.
    """

    SHRINK: ClassVar[dict[str, int]] = {"NFC": 4, "NFKC": 4, "NFD": 1, "NFKD": 1, "Prepend": 1, "Lowercase": 1}

    def __init__(self, tokenizer, window: int):
        self.tokenizer, self.window = tokenizer, window
        shrink = self._shrink(json.loads(tokenizer.backend_tokenizer.to_str()).get("normalizer")) \
            if hasattr(tokenizer, "backend_tokenizer") else None
        self.max_chars = window * self._longest_token() * shrink if shrink else None

    def _longest_token(self) -> int:
        added = [len(t.content) for t in self.tokenizer.added_tokens_decoder.values()]
        return max([len(k) for k in self.tokenizer.get_vocab()] + added)

    @classmethod
    def _shrink(cls, normalizer: dict | None) -> int | None:
        """The most the normalizer can shorten a text by (None: no bound)."""
        if normalizer is None:
            return 1
        kind = normalizer.get("type")
        if kind == "Sequence":
            factors = [cls._shrink(n) for n in normalizer["normalizers"]]
            return None if None in factors else functools.reduce(operator.mul, factors, 1)
        if kind == "Replace" and set(normalizer["pattern"]) == {"String"} and normalizer["content"]:
            return max(1, -(-len(normalizer["pattern"]["String"]) // len(normalizer["content"])))
        return cls.SHRINK.get(kind)

    async def chat(self, messages: list[dict]) -> list[int]:
        return await asyncio.to_thread(self._chat, messages)

    async def text(self, prompt: str) -> list[int]:
        return await asyncio.to_thread(self._text, prompt)

    def _chat(self, messages: list[dict]) -> list[int]:
        try:  # the rendered text is what gets tokenized, so the bound holds whatever the template does
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may refuse a conversation (e.g. roles that do not alternate)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        self._check_length(text, "messages")
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _text(self, prompt: str) -> list[int]:
        self._check_length(prompt, "prompt")
        try:
            return encode(self.tokenizer, prompt, chat=False)
        except OverfillError as e:
            raise APIError(400, str(e), param="prompt") from None

    def _check_length(self, text: str, param: str) -> None:
        if self.max_chars is not None and len(text) > self.max_chars:
            raise APIError(400, f"This model's maximum context length is {self.window} tokens, but the prompt has "
                                f"{len(text)} characters, which is surely more. Please shorten the prompt.",
                           param=param, code="context_length_exceeded")
