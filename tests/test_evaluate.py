import copy
import json
import math
import statistics
import time

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from overfill import data
from overfill import evaluate as ev
from overfill.cli import main
from overfill.errors import OverfillError
from overfill.hub import load_tokenizer
from overfill.report import load_results
from overfill.tasks import Doc, Task, shared_context_doc
from overfill.two_stage import TwoStageModel, split_logits
from conftest import ours, save_hf_dir as save_tiny, tiny_hf_model

VOCAB = 49152  # the SmolLM2 tokenizer's: real tokenisation, tiny random weights


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def full_hf():
    return tiny_hf_model("llama", seed=0, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def decoder_hf():
    return tiny_hf_model("llama", seed=1, vocab_size=VOCAB, hidden_size=32, intermediate_size=48)


def hf_logprobs(hf, context, continuation):
    """log P(continuation | context) and is_greedy from one transformers forward: the reference."""
    with torch.no_grad():
        logp = hf(torch.tensor([context + continuation])).logits[0, len(context) - 1:-1].log_softmax(-1)
    target = torch.tensor(continuation)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


QUESTIONS = [
    ("Question: What is the capital of France?\nAnswer:", ["Paris", "Lyon", "a small town in the north"], 0),
    ("Question: Which animal barks?\nAnswer:", ["dog", "cat", "an owl at night", "fish"], 0),
    ("The sky on a clear day is", ["blue", "green as grass in spring"], 0),
]


def mc_task():
    docs = [shared_context_doc(str(i), q, choices, gold) for i, (q, choices, gold) in enumerate(QUESTIONS)]
    return Task("toy_mc", "multiple_choice", docs, "test", "in memory")


def lambada_task():
    texts = ["She opened the door and saw her old friend", "The cat sat on the warm", "He paid the bill and left a tip"]
    docs = [Doc(str(i), (t.rsplit(" ", 1)[0],), (" " + t.rsplit(" ", 1)[1],), (t.rsplit(" ", 1)[1],), 0)
            for i, t in enumerate(texts)]
    return Task("toy_lambada", "last_word", docs, "test", "in memory")


# ---------------------------------------------------------------------------- tokenisation

def test_encode_pair_splits_the_whole_encoding_and_moves_trailing_spaces(tokenizer):
    context, continuation = ev.encode_pair(tokenizer, "Question: Capital of France?\nAnswer:", " Paris")
    assert context + continuation == tokenizer.encode("Question: Capital of France?\nAnswer: Paris")
    assert tokenizer.decode(continuation) == " Paris"
    assert ev.encode_pair(tokenizer, "Question: Capital of France?\nAnswer: ", "Paris") == (context, continuation)
    # an empty context is the prefix token (BOS here), as in the harness
    assert ev.encode_pair(tokenizer, "", "Hello") == ([tokenizer.bos_token_id], tokenizer.encode("Hello"))


def test_fit_window_cuts_the_context_from_the_left():
    assert ev.fit_window([1, 2, 3, 4, 5], [6, 7], window=4) == ([3, 4, 5], [6, 7])
    assert ev.fit_window([1, 2], [6, 7], window=8) == ([1, 2], [6, 7])
    with pytest.raises(OverfillError, match="does not fit"):
        ev.fit_window([1], [2, 3, 4], window=2)
    with pytest.raises(OverfillError, match="empty continuation"):
        ev.fit_window([1], [], window=2)


# ---------------------------------------------------------------------------- scoring

def test_full_mode_metrics_match_a_hand_computation(tokenizer, full_hf):
    model = TwoStageModel(ours(full_hf), None, tokenizer)
    task = mc_task()
    requests = ev.task_requests(task, tokenizer)
    scores = ev.loglikelihoods(model, "full", requests, batch_size=3)
    reference = [hf_logprobs(full_hf, c, k) for c, k in requests]
    assert_close(torch.tensor([s for s, _ in scores]), torch.tensor([r for r, _ in reference]), atol=1e-4, rtol=0)
    assert [g for _, g in scores] == [g for _, g in reference]

    acc, acc_norm, start = [], [], 0
    for question, choices, gold in QUESTIONS:
        lls = np.array([r for r, _ in reference[start:start + len(choices)]])
        start += len(choices)
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in choices])) == gold))
    metrics = ev.task_metrics(task, scores)
    assert metrics["samples"] == 3 and metrics["requests"] == len(requests)
    assert metrics["acc"] == statistics.mean(acc) and metrics["acc_norm"] == statistics.mean(acc_norm)
    assert metrics["acc_stderr"] == pytest.approx(statistics.stdev(acc) / math.sqrt(3))


def test_last_word_metrics_match_a_hand_computation(tokenizer, full_hf):
    model = TwoStageModel(ours(full_hf), None, tokenizer)
    task = lambada_task()
    requests = ev.task_requests(task, tokenizer)
    reference = [hf_logprobs(full_hf, c, k) for c, k in requests]
    metrics = ev.task_metrics(task, ev.loglikelihoods(model, "full", requests))
    assert metrics["perplexity"] == pytest.approx(math.exp(-statistics.mean(r for r, _ in reference)), rel=1e-4)
    assert metrics["acc"] == statistics.mean(float(g) for _, g in reference)


def test_acc_norm_divides_by_characters_and_ties_go_first():
    assert ev.choice_predictions([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)
    assert ev.choice_predictions([-2.0, -2.0], ["x", "y"]) == (0, 0)


def requests_with_shared_contexts(tokenizer):
    return ev.task_requests(mc_task(), tokenizer) + ev.task_requests(lambada_task(), tokenizer)


def test_overfill_with_the_full_model_as_decoder_equals_full_mode(tokenizer, full_hf):
    full = ours(full_hf)
    model = TwoStageModel(full, copy.deepcopy(full), tokenizer)
    requests = requests_with_shared_contexts(tokenizer)
    overfill = ev.loglikelihoods(model, "overfill", requests, batch_size=4)
    alone = ev.loglikelihoods(model, "full", requests, batch_size=64)
    assert_close(torch.tensor([s for s, _ in overfill]), torch.tensor([s for s, _ in alone]), atol=1e-4, rtol=0)
    assert [g for _, g in overfill] == [g for _, g in alone]


def test_overfill_mode_equals_teacher_forced_split_logits(tokenizer, full_hf, decoder_hf):
    """Shared prefills and cache copies give what split_logits gives one request at a time."""
    model = TwoStageModel(ours(full_hf), ours(decoder_hf), tokenizer)
    requests = requests_with_shared_contexts(tokenizer)
    scores = ev.loglikelihoods(model, "overfill", requests, batch_size=5)
    for (context, continuation), (logprob, greedy) in zip(requests, scores):
        tokens = torch.tensor([context + continuation[:-1]])
        prompt_mask = torch.arange(tokens.shape[1])[None] < len(context)
        with torch.no_grad():
            logits, _ = split_logits(model.full, model.decoder, tokens, torch.ones_like(tokens), prompt_mask)
        logp = logits[0, len(context) - 1:].log_softmax(-1)
        target = torch.tensor(continuation)
        assert logprob == pytest.approx(logp.gather(-1, target[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == target).all())


def test_decoder_mode_is_the_decoder_alone(tokenizer, full_hf, decoder_hf):
    model = TwoStageModel(ours(full_hf), ours(decoder_hf), tokenizer)
    requests = requests_with_shared_contexts(tokenizer)
    scores = ev.loglikelihoods(model, "decoder", requests, batch_size=7)
    reference = [hf_logprobs(decoder_hf, c, k) for c, k in requests]
    assert_close(torch.tensor([s for s, _ in scores]), torch.tensor([r for r, _ in reference]), atol=1e-4, rtol=0)


def test_long_contexts_are_cut_like_the_harness(tokenizer, full_hf):
    model = TwoStageModel(ours(full_hf), None, tokenizer)
    context, continuation = list(range(100, 130)), [7, 8, 9]
    (logprob, _), = ev.loglikelihoods(model, "full", [(context, continuation)], window=10)
    kept = (context + continuation)[-11:]  # the harness feeds (ctx + cont)[-(L + 1):][:-1]
    assert logprob == pytest.approx(hf_logprobs(full_hf, kept[:-3], continuation)[0], abs=1e-4)


def test_modes_need_a_decoder(tokenizer, full_hf):
    model = TwoStageModel(ours(full_hf), None, tokenizer)
    for mode in ("decoder", "overfill"):
        with pytest.raises(OverfillError, match="needs a decoder"):
            ev.loglikelihoods(model, mode, [([1], [2])])
    with pytest.raises(OverfillError, match="unknown mode 'fast'"):
        ev.resolve_mode("fast", has_decoder=True)
    assert ev.resolve_mode(None, True) == "overfill" and ev.resolve_mode(None, False) == "full"


# ---------------------------------------------------------------------------- chat quality

def chat_examples(tokenizer):
    chats = [("What is 2 + 2?", "2 + 2 is 4."), ("Name a colour.", "Blue is a colour."), ("Say hi.", "Hi there!")]
    return [data.chat_examples([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenizer)[0]
            for q, a in chats]


def test_response_agreement_matches_a_hand_computation(tokenizer, full_hf, decoder_hf):
    model = TwoStageModel(ours(full_hf), ours(decoder_hf), tokenizer)
    examples = chat_examples(tokenizer)
    measures = ev.response_agreement(model, "overfill", [(e.prompt_ids, e.response_ids) for e in examples], 2)
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for e in examples:
        tokens = torch.tensor([e.prompt_ids + e.response_ids[:-1]])
        prompt_mask = torch.arange(tokens.shape[1])[None] < len(e.prompt_ids)
        with torch.no_grad():
            logits, _ = split_logits(model.full, model.decoder, tokens, torch.ones_like(tokens), prompt_mask)
            reference = full_hf(tokens).logits
        start = len(e.prompt_ids) - 1
        logp, ref_logp = logits[0, start:].log_softmax(-1), reference[0, start:].log_softmax(-1)
        nll -= logp.gather(-1, torch.tensor(e.response_ids)[:, None]).sum().item()
        kl += torch.nn.functional.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        n += len(e.response_ids)
    assert measures["tokens"] == n
    assert measures["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert measures["kl_from_full"] == pytest.approx(kl / n, rel=1e-3, abs=1e-5)
    assert measures["top1_agreement"] == agree / n


def test_chat_quality_of_an_identical_decoder_is_perfect_agreement(tokenizer, full_hf):
    full = ours(full_hf)
    model = TwoStageModel(full, copy.deepcopy(full), tokenizer)
    quality = ev.chat_quality(model, "overfill", chat_examples(tokenizer), batch_size=2, max_new_tokens=6)
    assert quality["top1_agreement"] == 1.0 and quality["kl_from_full"] == pytest.approx(0.0, abs=1e-5)
    assert quality["greedy_full_match"] == 1.0 and quality["greedy_matching_tokens"] >= 1


def test_matching_tokens_counts_a_shared_eos():
    assert ev.matching_tokens(([1, 2, 3], False), ([1, 2, 4], False)) == 2
    assert ev.matching_tokens(([1, 2], True), ([1, 2], True)) == 3
    assert ev.matching_tokens(([1, 2], True), ([1, 2, 5], False)) == 2


# ---------------------------------------------------------------------------- command, results, report

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2_dir, full_hf, decoder_hf):
    root = tmp_path_factory.mktemp("models")
    return (save_tiny(full_hf, smollm2_dir, root / "full"), save_tiny(decoder_hf, smollm2_dir, root / "decoder"))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """A .jsonl whose records fall in the validation split (it hashes their ids)."""
    ids = [f"chat-{i}" for i in range(5000) if data.in_validation(f"chat-{i}", 0.01)][:2]
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "prompt": "Tell me a fact.", "response": "Water is wet."})
                              for i in ids))
    return str(path)


def test_eval_command_three_modes_and_report(tmp_path, tiny_dirs, chat_file):
    full, decoder = map(str, tiny_dirs)
    outs = []
    for mode in ("full", "decoder", "overfill"):
        out = tmp_path / f"{mode}.json"
        assert main(["eval", "--full", full, "--decoder", decoder, "--mode", mode, "--tasks", "arc_easy,lambada",
                     "--limit", "3", "--chat-examples", "2", "--chat-source", chat_file,
                     "--chat-max-new-tokens", "4", "--out", str(out)]) == 0
        outs.append(str(out))
    record = load_results(outs[2])
    assert record["mode"] == "overfill" and record["models"]["decoder"] == decoder
    assert record["models"]["decode_params"] == record["models"]["decoder_params"] < record["models"]["full_params"]
    assert record["settings"]["limit"] == 3 and record["tasks"]["arc_easy"]["samples"] == 3
    assert {"acc", "acc_norm", "acc_stderr", "seconds"} <= set(record["tasks"]["arc_easy"])
    assert {"acc", "perplexity"} <= set(record["tasks"]["lambada"]) and record["chat"]["examples"] == 2
    assert len(record["models"]["full_weights_sha256"]) == 64

    report = tmp_path / "report.md"
    assert main(["eval", "--report", *outs, "--out", str(report)]) == 0
    text = report.read_text()
    assert "| task | metric | full | pruned | OverFill |" in text
    assert "| arc_easy | acc_norm |" in text and "**average** (2 tasks)" in text and "top-1 agreement" in text
    assert report.with_suffix(".png").stat().st_size > 1000


def test_unknown_task_lists_the_available_ones(tiny_dirs):
    with pytest.raises(OverfillError, match="unknown task 'nope'.*arc_easy"):
        ev.evaluate(ev.EvalConfig(full=str(tiny_dirs[0]), tasks="arc_easy,nope"))


# ---------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def smollm2_decoder(tmp_path_factory):
    from overfill.prune import PruneConfig, prune

    out = tmp_path_factory.mktemp("pruned") / "decoder"
    texts = ["The quick brown fox jumps over the lazy dog. " * 8, "Paris is the capital of France. " * 8]
    prune("smollm2-135m-instruct", PruneConfig(hidden=0.45, intermediate=0.45, samples=2, seq_len=64), out, texts)
    return str(out)


@pytest.mark.slow
def test_default_suite_on_smollm2_in_three_modes(tmp_path, smollm2_decoder, chat_file):
    started = time.perf_counter()
    outs = []
    for mode in ("full", "decoder", "overfill"):
        out = tmp_path / f"{mode}.json"
        assert main(["eval", "--decoder", smollm2_decoder, "--mode", mode, "--limit", "5", "--chat-examples", "2",
                     "--chat-source", chat_file, "--chat-max-new-tokens", "8", "--out", str(out)]) == 0
        outs.append(str(out))
    records = [load_results(o) for o in outs]
    assert all(list(r["tasks"]) == list(ev.task_names("default")) for r in records)
    full, pruned, overfill = (r["average"]["acc"] for r in records)
    # the decoder is pruned but untrained: alone it is lost; in OverFill the full model reads the
    # context and picks the first token, which is most of a LAMBADA word
    ppl = [r["tasks"]["lambada"]["perplexity"] for r in records]
    assert ppl[0] < ppl[2] < ppl[1]
    assert records[0]["chat"]["top1_agreement"] == 1.0 and records[0]["chat"]["kl_from_full"] < 1e-6
    assert main(["eval", "--report", *outs, "--out", str(tmp_path / "report.md")]) == 0
    print(f"default suite, --limit 5, three modes: {time.perf_counter() - started:.0f} s; "
          f"average acc full {full:.3f} pruned {pruned:.3f} OverFill {overfill:.3f}")
