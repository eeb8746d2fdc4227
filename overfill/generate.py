"""The text layer over the engine: chat templates, EOS and stop strings, incremental detokenisation.

`generate` completes a batch of prompts, `stream` yields one completion's text as it grows; both
run the engine's `BatchDecoder` (overfill.engine), which knows token ids only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from .engine import BatchDecoder, SamplingParams, finish_reason
from .errors import OverfillError
from .two_stage import TwoStageModel

__all__ = ["Completion", "SamplingParams", "TextState", "encode", "generate", "stream", "stream_batch"]

# ---------------------------------------------------------------------------- text

@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    """"stop" (EOS or a stop string) or "length"."""
    prompt_tokens: int


class TextState:
    """One row's output text: EOS, length and stop strings, and the pieces that are safe to show.

    Detokenisation is incremental: each token decodes a short window of ids (those since the last
    complete character), not the whole text, and a partial UTF-8 character waits for its last byte.
    """

    def __init__(self, tokenizer, params: SamplingParams, max_new: int, eos_ids: set[int], prompt_tokens: int):
        self.tokenizer, self.params, self.max_new, self.eos_ids = tokenizer, params, max_new, eos_ids
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []
        self.text, self.emitted, self.finish_reason = "", 0, None
        self._prefix = self._read = 0  # ids[_prefix:_read] decoded into the text's end; ids[_read:] are pending

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take one token; return the text that can now be shown."""
        reason = finish_reason(token, self.params, self.eos_ids, len(self.ids) + 1, self.max_new)
        if reason == "stop":
            return self.end("stop")
        self.ids.append(token)
        self._detokenize()
        for s in self.params.stop:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at >= 0:
                self.text, self.finish_reason = self.text[:at], "stop"
                return self._flush()
        if reason == "length":
            return self.end("length")
        return self._flush(hold=self._held_back())

    def end(self, reason: str) -> str:
        """End the text; the rest of it, less a partial UTF-8 character, which will never be completed."""
        self.finish_reason = reason
        return self._flush()

    def _detokenize(self) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _held_back(self) -> int:
        """Characters to keep back: a possible stop-string start."""
        held = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def _flush(self, hold: int = 0) -> str:
        end = max(self.emitted, len(self.text) - hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece

    def completion(self) -> Completion:
        return Completion(self.text, self.ids, self.finish_reason or "length", self.prompt_tokens)


def encode(tokenizer, prompt: str | list[dict], chat: bool = True, system: str | None = None) -> list[int]:
    """Token ids of a prompt: a chat (list of messages) or a string (a user message if `chat`)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise OverfillError("empty prompt")
        if not chat or not tokenizer.chat_template:
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
        prompt = [{"role": "user", "content": prompt}]
    if not prompt:
        raise OverfillError("empty list of messages")
    if system is not None:
        prompt = [{"role": "system", "content": system}] + list(prompt)
    for m in prompt:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise OverfillError(f"a chat message needs 'role' and 'content': {m!r}")
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def stream_batch(model: TwoStageModel, prompt_ids: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams], refresh_every: int | None = None,
                 compile: bool = False) -> Iterator[tuple[int, str, TextState]]:
    """Yield `(row, new_text, state)` as rows produce text; every row ends with `state.done`."""
    params = [params] * len(prompt_ids) if isinstance(params, SamplingParams) else list(params)
    refresh_every = model.config.refresh_every if refresh_every is None else refresh_every
    loop = BatchDecoder(model, prompt_ids, params, refresh_every=refresh_every, compile=compile)
    eos = model.eos_token_ids
    states = [TextState(model.tokenizer, p, n, eos, len(ids)) for p, n, ids in zip(params, loop.max_new, prompt_ids)]
    tokens = loop.first()
    while True:
        for b, token in enumerate(tokens.tolist()):
            if not states[b].done:
                piece = states[b].add(token)
                if piece or states[b].done:
                    yield b, piece, states[b]
        if all(s.done for s in states):
            return
        tokens = loop.next()


def generate(model: TwoStageModel, prompts: Sequence[str | list[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, chat: bool = True,
             refresh_every: int | None = None) -> list[Completion]:
    """Complete a batch of prompts (strings or chats); one Completion per prompt, in order."""
    params = params or SamplingParams()
    ids = [encode(model.tokenizer, p, chat) for p in prompts]
    states: dict[int, TextState] = {}
    for row, _, state in stream_batch(model, ids, params, refresh_every):
        states[row] = state
    return [states[b].completion() for b in range(len(ids))]


def stream(model: TwoStageModel, prompt: str | list[dict], params: SamplingParams | None = None,
           chat: bool = True, refresh_every: int | None = None) -> Iterator[str]:
    """Text pieces of one completion as they are generated."""
    ids = [encode(model.tokenizer, prompt, chat)]
    for _, piece, _ in stream_batch(model, ids, params or SamplingParams(), refresh_every):
        if piece:
            yield piece
