import json

import pytest

from overfill import data
from overfill.data import load_examples
from overfill.errors import OverfillError
from overfill.hub import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_chat_split_at_each_assistant_turn(tokenizer):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": " Bye "}, {"role": "assistant", "content": "Ciao"}]
    first, second = data.chat_examples(chat, tokenizer, uid="c")
    assert decode(tokenizer, first.prompt_ids) == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tokenizer, first.response_ids) == "Hello!<|im_end|>"
    assert decode(tokenizer, second.prompt_ids) == (
        SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert decode(tokenizer, second.response_ids) == "Ciao<|im_end|>"
    assert second.response_ids[-1] == tokenizer.eos_token_id
    assert (first.uid, second.uid) == ("c#0", "c#1")


def test_prompt_is_what_inference_tokenises(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    (example,) = data.chat_examples(chat, tokenizer)
    served = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert example.prompt_ids == tokenizer(served, add_special_tokens=False)["input_ids"]
    assert decode(tokenizer, example.prompt_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_normalisation_drops_empty_turns_and_merges_roles():
    turns = [("system", "  "), ("human", "a"), ("user", "b "), ("gpt", ""), ("gpt", "c")]
    assert data.normalise_messages(turns) == [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(ValueError, match="unknown role 'bing'"):
        data.normalise_messages([("bing", "x")])


def test_chat_without_assistant_turn(tokenizer, tmp_path):
    with pytest.raises(OverfillError, match="no assistant turn"):
        data.chat_examples([{"role": "user", "content": "Hi"}], tokenizer)
    with pytest.raises(OverfillError, match="unknown role 'bot'"):
        data.chat_examples([{"role": "bot", "content": "Hi"}], tokenizer)
    # an opening assistant turn answers nothing: it is context, not a target
    with pytest.raises(OverfillError, match="no assistant turn"):
        data.chat_examples([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "yo"}], tokenizer)
    source = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"prompt": "Q", "response": "A"},
    ])
    (example,) = load_examples(source, tokenizer, val_fraction=0.0)
    assert decode(tokenizer, example.response_ids) == "A<|im_end|>"


def test_jsonl_forms_and_text_cut(tokenizer, tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    source = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
        {"prompt": "p", "response": "r", "system": "s"},
        {"text": text},
    ])
    examples = {e.uid: e for e in load_examples(source, tokenizer, val_fraction=0.0)}
    assert sorted(examples) == ["d.jsonl:1#0", "d.jsonl:2#0", "d.jsonl:3#0", "d.jsonl:4"]
    assert decode(tokenizer, examples["d.jsonl:3#0"].prompt_ids).startswith("<|im_start|>system\ns<|im_end|>")
    cut = examples["d.jsonl:4"]
    assert decode(tokenizer, cut.prompt_ids + cut.response_ids) == text.strip()
    assert cut.prompt_ids and cut.response_ids
    assert data.text_example(text.strip(), tokenizer, uid="d.jsonl:4") == cut  # the cut depends on the text only


def test_txt_blocks(tokenizer, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first document, long enough\n\n \n\nsecond one here\nstill second\n")
    records = list(data.iter_records(str(path)))
    assert [r.text for r in records] == ["first document, long enough", "second one here\nstill second"]
    assert len(load_examples(str(path), tokenizer, val_fraction=0.0)) == 2


def test_truncation_rule(tokenizer):
    chat = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "reply " * 300}]
    (full,) = data.chat_examples(chat, tokenizer, max_len=10_000, max_prompt_len=5_000)
    (cut,) = data.chat_examples(chat, tokenizer, max_len=200, max_prompt_len=120)
    assert cut.prompt_ids == full.prompt_ids[-120:]  # the prompt keeps its end (the assistant header)
    assert cut.response_ids == full.response_ids[:80]  # the response keeps its start, to max_len in all
    # a response cut below MIN_RESPONSE_TOKENS is dropped; one that fits whole is kept however short
    assert data.chat_examples(chat, tokenizer, max_len=120 + data.MIN_RESPONSE_TOKENS - 1, max_prompt_len=120) == []
    short = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    (kept,) = data.chat_examples(short, tokenizer, max_len=125, max_prompt_len=120)
    assert len(kept.response_ids) < data.MIN_RESPONSE_TOKENS
    with pytest.raises(OverfillError, match="max_prompt_len < max_len"):
        load_examples("sharegpt", tokenizer, max_len=100, max_prompt_len=100)


def test_split_depends_only_on_the_key(tokenizer, tmp_path):
    records = [{"id": f"conv-{i}", "prompt": f"question {i}", "response": f"answer {i}"} for i in range(200)]
    forward = write_jsonl(tmp_path / "a.jsonl", records)
    backward = write_jsonl(tmp_path / "b.jsonl", records[::-1])

    def split_ids(source, split, seed=0):
        return {tokenizer.decode(e.response_ids) for e in load_examples(source, tokenizer, split, val_fraction=0.2, seed=seed)}

    validation = split_ids(forward, "validation")
    assert validation == split_ids(backward, "validation") == split_ids(forward, "validation", seed=1)
    assert validation.isdisjoint(split_ids(forward, "train"))
    assert len(validation | split_ids(forward, "train")) == 200
    assert 20 < len(validation) < 60  # about val_fraction of the keys
    moved = [{**r, "id": r["id"] + "-renamed"} for r in records]
    assert split_ids(write_jsonl(tmp_path / "c.jsonl", moved), "validation") != validation


def test_limit_is_a_prefix_of_the_seeded_order(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(30)])
    everything = load_examples(source, tokenizer, val_fraction=0.0, seed=3)
    assert load_examples(source, tokenizer, val_fraction=0.0, seed=3, limit=7) == everything[:7]
    assert load_examples(source, tokenizer, val_fraction=0.0, seed=4) != everything


def test_bad_sources(tokenizer, tmp_path):
    with pytest.raises(OverfillError, match="built-in sources are 'sharegpt'"):
        load_examples("sharegtp", tokenizer)
    with pytest.raises(OverfillError, match="not found"):
        load_examples(str(tmp_path / "missing.jsonl"), tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(OverfillError, match="bad.jsonl, line 2: not valid JSON"):
        load_examples(str(bad), tokenizer)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q"}])
    with pytest.raises(OverfillError, match="line 1: expected one of the keys"):
        load_examples(unknown, tokenizer)
    role = write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(OverfillError, match="line 1: unknown role 'robot'"):
        load_examples(role, tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(OverfillError, match="no usable examples"):
        load_examples(str(empty), tokenizer)


def test_template_whose_prompt_is_not_a_prefix(tokenizer):
    class Reordering:  # renders the generation prompt somewhere the answer does not follow
        chat_template = "x"
        eos_token_id = tokenizer.eos_token_id

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "|".join(m["content"] for m in messages) + ("<gen>" if add_generation_prompt else "")

    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(OverfillError, match="chat template problem"):
        data.chat_examples(chat, Reordering())


def test_json_array_stops_at_the_cut():
    complete = [{"id": "a_0", "conversations": [{"from": "human", "value": "x"}]}, {"id": "b_0", "conversations": []}]
    text = json.dumps(complete, indent=2)[:-1] + ',\n  {"id": "c_0", "conversations": [{"from": "human", "va'
    assert list(data.iter_json_array(text)) == complete
    assert list(data.iter_json_array(json.dumps(complete))) == complete
    assert list(data.iter_json_array("[]")) == []


def test_sharegpt_pieces_share_a_split_key(monkeypatch, tmp_path):
    chats = [{"id": f"abc_{i}", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(3)]
    chats.append({"id": "odd_0", "conversations": [{"from": "bing", "value": "q"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(chats)[:-20])  # cut inside the last chat
    monkeypatch.setattr(data, "sharegpt_path", lambda: path)
    records = list(data.iter_records("sharegpt"))
    assert [(r.key, r.uid) for r in records] == [("abc", "sharegpt:abc_0"), ("abc", "sharegpt:abc_1"), ("abc", "sharegpt:abc_2")]


def test_calibration_texts(tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)])
    plain = data.calibration_texts(source, n=3, val_fraction=0.0)
    assert len(plain) == 3 and all(t.startswith("u") and "\n\na" in t for t in plain)
    assert data.calibration_texts(source, n=3, val_fraction=0.0) == plain
    assert len(data.calibration_texts(source, n=50, val_fraction=0.0)) == 5
    rendered = data.calibration_texts(source, n=1, tokenizer=tokenizer, val_fraction=0.0)[0]
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_end|>\n")


@pytest.mark.slow
def test_real_sharegpt(tokenizer):
    records = list(data.iter_records("sharegpt"))
    assert 17_400 < len(records) < 17_700  # complete chats of the truncated file with known roles
    assert 60_000 < sum(len(data.target_turns(r.messages)) for r in records) < 62_000
    examples = load_examples("sharegpt", tokenizer, limit=200)
    assert len(examples) == 200
    assert all(len(e.prompt_ids) <= 768 and len(e.prompt_ids) + len(e.response_ids) <= 1024 for e in examples)
    for e in examples:  # a response ends with the end-of-turn token unless the length rule cut it
        assert e.response_ids[-1] == tokenizer.eos_token_id or len(e.prompt_ids) + len(e.response_ids) == 1024
    texts = data.calibration_texts("sharegpt", n=4)
    assert len(texts) == 4 and all(texts)
