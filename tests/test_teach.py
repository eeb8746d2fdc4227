"""`overfill teach`: the full model's own answers as training data, read back as token records."""
import gzip
import json
from pathlib import Path

import pytest

from overfill.data import load_examples
from overfill.errors import OverfillError
from overfill.teach import TeachConfig, teach
from overfill.train import TrainConfig, train
from conftest import chat, save_tiny, validation_ids, word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teach")
    val = validation_ids(2)
    records = [chat(i, 4 + i % 4) for i in range(12)] + [chat(i, 5) for i in val]
    return {"full": str(save_tiny(root / "full", seed=0)),
            "pruned": str(save_tiny(root / "pruned", seed=1, hidden_size=32, intermediate_size=48)),
            "data": str(write_jsonl(root / "chats.jsonl", records)), "val": {f"chat{i}" for i in val}}


def settings(world, out, **overrides):
    base = dict(out=str(out), full=world["full"], data=world["data"], examples=10, val_examples=2, max_len=64,
                max_new_tokens=12, batch_size=4, precision="fp32", temperature=1.0)
    return TeachConfig(**(base | overrides))


def lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_teacher_answers_the_trainers_prompts_in_their_splits(world, tmp_path):
    out = teach(settings(world, tmp_path / "t.jsonl"))
    written = lines(out)
    tok = word_tokenizer()
    train_examples = load_examples(world["data"], tok, "train", 64, 48, limit=10)
    assert [w["uid"] for w in written[:10]] == [e.uid for e in train_examples]
    assert [w["prompt_ids"] for w in written[:10]] == [e.prompt_ids for e in train_examples]
    assert {w["id"] for w in written[10:]} <= world["val"] and len(written) == 12
    for w in written:
        assert 1 <= len(w["response_ids"]) <= 13 and (w["response_ids"][-1] == tok.eos_token_id) == (w["finish"] == "stop")
    # read back as data: the same ids, in the same splits
    again = load_examples(str(out), tok, "train", 64, 48)
    assert sorted(e.uid for e in again) == sorted(w["uid"] for w in written[:10])
    by_uid = {w["uid"]: w for w in written}
    assert all(e.response_ids == by_uid[e.uid]["response_ids"] for e in again)
    assert len(load_examples(str(out), tok, "validation", 64, 48)) == 2
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["finished"] and meta["config"]["temperature"] == 1.0 and len(meta["full_weights"]) == 64


def test_a_stopped_run_resumes_to_the_same_text_and_gz_is_read(world, tmp_path):
    whole = lines(teach(settings(world, tmp_path / "whole.jsonl")))
    out = tmp_path / "again.jsonl.gz"
    partial = tmp_path / "again.jsonl.partial"
    partial.write_text("".join(json.dumps(w) + "\n" for w in whole[:4]) + '{"id": "cut off')  # killed mid-line
    teach(settings(world, out))
    assert lines(out) == whole and not partial.exists()
    assert len(load_examples(str(out), word_tokenizer(), "train", 64, 48)) == 10


def test_refusals(world, tmp_path):
    with pytest.raises(OverfillError, match="must end in .jsonl"):
        settings(world, tmp_path / "t.txt")
    with pytest.raises(OverfillError, match="examples must be positive"):
        settings(world, tmp_path / "t.jsonl", examples=0)
    (tmp_path / "done.jsonl").write_text("")
    with pytest.raises(OverfillError, match="exists already"):
        teach(settings(world, tmp_path / "done.jsonl"))


def test_token_records_from_another_tokenizer_are_refused(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "prompt_ids": [1, 5], "response_ids": [7, 40000]}])
    with pytest.raises(OverfillError, match="token id 40000"):
        load_examples(str(data), word_tokenizer(), "train", 64, 48)
    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt_ids": [1, -5], "response_ids": [7]}])
    with pytest.raises(OverfillError, match="list of token ids"):
        load_examples(str(data), word_tokenizer(), "train", 64, 48)


def test_pure_distillation_trains_on_the_kl_alone(world, tmp_path):
    out = teach(settings(world, tmp_path / "t.jsonl"))
    base = dict(full=world["full"], decoder=world["pruned"], data=str(out), steps=2, batch_size=4, lr=1e-3,
                warmup=1, max_len=64, checkpoint_every=0, eval_every=2, val_examples=2, precision="fp32")
    for mode in ("overfill", "pruned"):
        cfg = TrainConfig(**base, out=str(tmp_path / mode), mode=mode, ce_weight=0.0, kd_weight=1.0)
        train(cfg)
        records = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r]
        assert all(r["loss"] == pytest.approx(r["kl"]) and r["ce"] > 0 for r in steps)
        assert all("val_kl" in r for r in records if "val_loss" in r)
    with pytest.raises(OverfillError, match="--ce-weight or --kd-weight"):
        TrainConfig(**base, out=str(tmp_path / "none"), ce_weight=0.0)


def test_a_rerun_with_fewer_prompts_keeps_only_theirs(world, tmp_path):
    whole = lines(teach(settings(world, tmp_path / "whole.jsonl")))
    partial = tmp_path / "fewer.jsonl.partial"
    partial.write_text("".join(json.dumps(w) + "\n" for w in whole[:8]))
    fewer = lines(teach(settings(world, tmp_path / "fewer.jsonl", examples=5, val_examples=0)))
    assert fewer == whole[:5]
