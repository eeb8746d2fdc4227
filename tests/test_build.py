"""`overfill build` end to end on a tiny random model with the real tokenizer and data."""
import json

import pytest

from overfill.build import BuildConfig, build
from overfill.errors import OverfillError
from conftest import tiny_hf_model


@pytest.fixture(scope="module")
def tiny_full(tmp_path_factory):
    from overfill.hub import load_tokenizer

    path = tmp_path_factory.mktemp("tiny") / "full"
    tiny_hf_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024).save_pretrained(path)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    return path


def tiny_build(full, out, **overrides) -> BuildConfig:
    settings = dict(full=str(full), out=str(out), hidden=0.5, intermediate=0.5, calibration_samples=4,
                    calibration_seq_len=64, steps=3, batch_size=2, max_len=128, warmup=1,
                    tasks="arc_easy,lambada", limit=3, chat_examples=2, bench_prompt_len=16, bench_new_tokens=4,
                    device="cpu")
    settings.update(overrides)
    return BuildConfig(**settings)


def test_build_runs_every_stage_and_resumes(tiny_full, tmp_path, monkeypatch):
    import overfill.evaluate as evaluate_module

    cfg = tiny_build(tiny_full, tmp_path / "run")
    real_evaluate = evaluate_module.evaluate
    calls = []

    def interrupted(eval_cfg, model=None):
        calls.append(eval_cfg.mode)
        if eval_cfg.mode == "decoder":
            raise KeyboardInterrupt  # the user stops the build in the middle of the evaluations
        return real_evaluate(eval_cfg, model)

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    run = tmp_path / "run"
    done = {p.name for p in run.glob("*.done.json")}
    assert done == {"prune.done.json", "train_overfill.done.json", "train_baseline.done.json", "eval_full.done.json"}
    stamps = {p.name: p.stat().st_mtime_ns for p in run.glob("*.done.json")}

    monkeypatch.setattr(evaluate_module, "evaluate", real_evaluate)
    report = build(cfg)
    for name, stamp in stamps.items():  # finished stages were skipped, not redone
        assert (run / name).stat().st_mtime_ns == stamp
    text = report.read_text()
    for expected in ("## Quality", "arc_easy", "lambada", "average", "## Latency", "TPOT"):
        assert expected in text
    assert (run / "quality.png").stat().st_size > 0
    full, pruned, overfill = (json.loads((run / "eval" / f"{n}.json").read_text()) for n in ("full", "pruned", "overfill"))
    assert (full["mode"], pruned["mode"], overfill["mode"]) == ("full", "decoder", "overfill")
    assert overfill["models"]["decode_params"] < full["models"]["decode_params"]
    record = json.loads((run / "pruned" / "prune_record.json").read_text())
    assert record["pruned"]["hidden_size"] < record["full"]["hidden_size"]
    summaries = [json.loads((run / trained / "summary.json").read_text()) for trained in ("overfill", "baseline")]
    assert [s["mode"] for s in summaries] == ["overfill", "pruned"]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 3
    assert summaries[0]["tokens"] == summaries[1]["tokens"]  # the same data and budget

    with pytest.raises(OverfillError, match="other settings"):
        build(tiny_build(tiny_full, run, steps=4))


def test_build_with_a_token_budget_through_the_cli(tiny_full, tmp_path):
    """The command of docs/RESULTS.md's form: --tokens with no --steps, --limit none."""
    from overfill.cli import main

    from overfill.data import in_validation

    # A small chat file: a token budget reads the whole source (all of ShareGPT would take minutes).
    ids = [i for i in range(5000) if in_validation(f"c{i}", 0.01)][:3] + list(range(40))
    chats = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Tell me about the number {i}."},
                                         {"role": "assistant", "content": f"The number {i} " + "is a number. " * 8}]}
             for i in ids]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    out = tmp_path / "run"
    argv = ["build", "--full", str(tiny_full), "--out", str(out), "--data", str(data), "--hidden", "0.5",
            "--intermediate", "0.5",
            "--calibration-samples", "4", "--calibration-seq-len", "64", "--tokens", "600", "--batch-size", "2",
            "--max-len", "128", "--warmup", "1", "--tasks", "arc_easy", "--limit", "2", "--chat-examples", "2",
            "--bench-prompt-len", "16", "--bench-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0
    summaries = [json.loads((out / trained / "summary.json").read_text()) for trained in ("overfill", "baseline")]
    assert all(s["tokens"] >= 600 for s in summaries) and summaries[0]["tokens"] == summaries[1]["tokens"]
    assert main(argv[:argv.index("--tokens")] + ["--tokens", "600", "--steps", "3"]) == 2  # both: refused


def test_optional_flags_can_be_unset():
    from overfill.build import BuildConfig
    from overfill.cli import parse_args

    assert parse_args(BuildConfig, []).limit == 50
    assert parse_args(BuildConfig, ["--limit", "none"]).limit is None
    assert parse_args(BuildConfig, ["--limit", "null"]).limit is None
    assert parse_args(BuildConfig, ["--limit", "7"]).limit == 7
    assert parse_args(BuildConfig, ["--tokens", "null"]).tokens is None
    with pytest.raises(SystemExit):
        parse_args(BuildConfig, ["--limit", "seven"])


@pytest.mark.parametrize("setting,words", [(dict(lr=float("inf")), "lr"), (dict(tokens=0), "tokens"),
                                           (dict(kd_weight=float("nan")), "kd_weight"), (dict(batch_size=0), "batch_size"),
                                           (dict(max_len=1), "max_len")])
def test_training_settings_are_refused_before_the_prune_stage(tmp_path, setting, words):
    # BuildConfig is made from the flags before any stage runs: refused there, not after minutes of pruning
    with pytest.raises(OverfillError, match="bad training settings: .*" + words):
        BuildConfig(out=str(tmp_path / "run"), **setting)
