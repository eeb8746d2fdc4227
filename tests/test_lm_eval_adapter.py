"""The `overfill` lm-evaluation-harness model against the harness's own `hf` model, on local task data."""
import json
import shutil
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from overfill import evaluate as ev  # noqa: E402
from overfill.lm_eval_adapter import OverfillLM  # noqa: E402
from conftest import tiny_hf_model  # noqa: E402

MAX_LENGTH = 24  # short, so that long contexts are cut and rolling texts span several windows

MC_DOCS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Lyon", "a small town"], "label": 0},
    {"question": "Which animal barks at the postman every morning?", "choices": ["dog", "cat", "owl", "fish"],
     "label": 0},
    {"question": "Water boils at sea level at a temperature of about how many degrees Celsius, roughly speaking, "
                 "in a normal kitchen?", "choices": ["100", "twelve", "minus forty degrees"], "label": 0},
]
TEXTS = ["She opened the door and saw her old friend standing in the rain, smiling as if nothing had happened. "
         "They talked for hours about the years that had passed, the places they had lived and the people they "
         "had lost, until the rain stopped and the first light came over the hills",  # three windows
         "The cat sat on the warm", "He paid the bill and left a generous tip"]
QA = [{"question": "Q: Name a colour.\nA:", "answer": "Blue"}, {"question": "Q: Two plus two?\nA:", "answer": "4"}]

TASKS = {
    "tiny_mc": ("mc.jsonl", MC_DOCS, """
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{label}}"
doc_to_choice: "{{choices}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""),
    "tiny_lambada": ("text.jsonl", [{"text": t} for t in TEXTS], """
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
"""),
    "tiny_rolling": ("text.jsonl", [{"text": t} for t in TEXTS], """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""),
    "tiny_gen": ("qa.jsonl", QA, """
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "ic"]  # "ic" cuts the tiny random model's text mid-way
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("tiny") / "model"
    tiny_hf_model("llama", seed=0, vocab_size=49152).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smollm2_dir / name, out / name)
    return str(out)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for task, (data_file, rows, spec) in TASKS.items():
        (root / data_file).write_text("\n".join(json.dumps(r) for r in rows))
        (root / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / data_file}\n"
            f"test_split: test\n{spec}")
    return str(root)


@pytest.fixture(scope="module")
def task_manager(task_dir):
    return TaskManager(include_path=task_dir, include_defaults=False)  # indexing all built-in tasks takes long


def run(model, task_manager):
    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0)


@pytest.fixture(scope="module")
def harness_results(model_dir, task_manager):
    return run(HFLM(pretrained=model_dir, device="cpu", batch_size=4, max_length=MAX_LENGTH), task_manager)


def responses(results, task):
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def assert_same_scores(ours, theirs):
    for task in TASKS:
        mine, reference = responses(ours, task), responses(theirs, task)
        if task == "tiny_gen":
            assert mine == reference
            continue
        flat = [r for doc in mine for request in doc for r in request]
        flat_reference = [r for doc in reference for request in doc for r in request]
        for a, b in zip(flat, flat_reference, strict=True):
            if isinstance(b, (tuple, list)):  # (log-likelihood, is_greedy)
                assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
            else:  # rolling: a log-likelihood
                assert a == pytest.approx(b, abs=1e-4)
        for metric, value in theirs["results"][task].items():
            if metric != "alias" and "stderr" not in metric:
                exact = metric.startswith(("acc", "exact_match")) or not isinstance(value, (int, float))
                assert ours["results"][task][metric] == (value if exact else pytest.approx(value, rel=1e-5)), metric


def test_registered_as_overfill():
    assert get_model("overfill") is OverfillLM


def test_overfill_with_the_full_model_as_decoder_equals_the_harness_hf_model(model_dir, task_manager,
                                                                            harness_results):
    ours = run(OverfillLM(full=model_dir, decoder=model_dir, mode="overfill", batch_size=3, max_length=MAX_LENGTH,
                          precision="fp32"),
               task_manager)
    assert_same_scores(ours, harness_results)


def test_encode_pair_is_the_harness_tokenisation(model_dir, tokenizer_pairs=(
        ("Question: Capital?\nAnswer:", " Paris"), ("Answer: ", "Paris"), ("a  ", " b"), ("x", "\n\ny"))):
    hf = HFLM(pretrained=model_dir, device="cpu")
    for context, continuation in tokenizer_pairs:
        assert ev.encode_pair(hf.tokenizer, context, continuation) == hf._encode_pair(context, continuation)


@pytest.mark.slow  # lm_eval's command line indexes all of its built-in tasks when it starts: tens of seconds
def test_lm_eval_command_line_with_the_overfill_model(model_dir, task_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "overfill.lm_eval_adapter", "--model", "overfill",
         "--model_args", f"full={model_dir},decoder={model_dir},max_length={MAX_LENGTH}", "--tasks", "tiny_mc",
         "--include_path", task_dir, "--output_path", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (results_file,) = out.rglob("results_*.json")
    assert "acc_norm,none" in json.loads(results_file.read_text())["results"]["tiny_mc"]
