import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from overfill.cli import main
from overfill.errors import OverfillError
from overfill.model import load_state_dict
from overfill.checkpoint import checkpoint_dirs, latest_checkpoint
from overfill.train import TrainConfig, Trainer, train
from overfill.two_stage import TwoStageModel
from conftest import chat, save_tiny, validation_ids, word_tokenizer, write_jsonl

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    val = validation_ids(3)
    records = [chat(i, 4 + i % 5) for i in range(24)] + [chat(i, 5) for i in val]
    return {
        "full": str(save_tiny(root / "full", seed=0)),
        "pruned": str(save_tiny(root / "pruned", seed=1, hidden_size=32, intermediate_size=48,
                                 tie_word_embeddings=True)),  # as SmolLM2: checkpoints hold shared tensors
        "data": str(write_jsonl(root / "chats.jsonl", records)),
        "root": root,
    }


def config(tiny, out, **overrides):
    base = dict(full=tiny["full"], decoder=tiny["pruned"], data=tiny["data"], out=str(out), steps=4,
                batch_size=4, lr=3e-3, warmup=1, max_len=64, checkpoint_every=0, eval_every=0, precision="fp32")
    return TrainConfig(**(base | overrides))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out):
    return [m["loss"] for m in metrics(out) if "loss" in m]


def reference_response_loss(model_dir, data_path):
    """The full model's own mean cross-entropy over all response tokens, with transformers."""
    from transformers import AutoModelForCausalLM

    from overfill.data import load_examples

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    examples = load_examples(data_path, word_tokenizer(), "train", max_len=64, max_prompt_len=48)
    for example in examples:
        ids = torch.tensor([example.prompt_ids + example.response_ids])
        P = len(example.prompt_ids)
        with torch.no_grad():
            logits = hf(ids).logits[0]
        total += torch.nn.functional.cross_entropy(logits[P - 1:-1], ids[0, P:], reduction="sum").item()
        count += len(example.response_ids)
    return total / count, len(examples)


@pytest.mark.parametrize("mode", ["overfill", "pruned"])
def test_step0_loss_with_decoder_equal_full_is_the_full_models_own_loss(tiny, tmp_path, mode):
    reference, n_examples = reference_response_loss(tiny["full"], tiny["data"])
    cfg = config(tiny, tmp_path / "out", decoder=tiny["full"], mode=mode, steps=1, batch_size=n_examples)
    train(cfg)
    first = metrics(cfg.out)[0]
    assert first["loss"] == pytest.approx(reference, rel=1e-5)
    assert first["tokens"] > 0


def test_kd_term_is_zero_when_the_decoder_is_the_full_model(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "same", decoder=tiny["full"], steps=1, kd_weight=1.0, lr=1e-9)
    train(cfg)
    first = metrics(cfg.out)[0]
    assert abs(first["kl"]) < 1e-6 and first["loss"] == pytest.approx(first["ce"], abs=1e-6)
    cfg = config(tiny, tmp_path / "pruned", steps=1, kd_weight=1.0, lr=1e-9)
    train(cfg)
    assert metrics(cfg.out)[0]["kl"] > 0.1


@pytest.mark.parametrize("mode", ["overfill", "pruned"])
def test_loss_falls_and_the_full_model_stays_bit_identical(tiny, tmp_path, mode):
    cfg = config(tiny, tmp_path / "out", mode=mode, kd_weight=0.5 if mode == "overfill" else 0.0, steps=30,
                 warmup=3, eval_every=15, val_examples=3)
    trainer = Trainer(cfg)
    trainer.run()
    losses = step_losses(cfg.out)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    val = [m["val_loss"] for m in metrics(cfg.out) if "val_loss" in m]
    assert [m["step"] for m in metrics(cfg.out) if "val_loss" in m] == [0, 15, 30]
    assert val[-1] < val[0]
    if mode == "overfill":
        on_disk = load_state_dict(tiny["full"])
        for name, p in trainer.full.named_parameters():
            assert not p.requires_grad and torch.equal(p, on_disk[name]), name
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens_per_s"] > 0 and summary["final_val_loss"] == val[-1]
    assert json.loads((Path(cfg.out) / "train_config.json").read_text())["mode"] == mode


def test_outputs_overfill_directory_and_plain_hf_directory(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    decoder = tmp_path / "pruned"
    save_tiny(decoder, seed=1, hidden_size=32, intermediate_size=48)
    (decoder / "prune_record.json").write_text(json.dumps({"layer_map": [0, 1]}))
    overfill = train(config(tiny, tmp_path / "overfill", decoder=str(decoder), steps=2))
    loaded = TwoStageModel.from_pretrained(overfill)
    assert loaded.is_two_stage and loaded.layer_map == [0, 1] and loaded.config.full == tiny["full"]
    assert loaded.config.extra["training"]["mode"] == "overfill"
    assert loaded.decoder.args.hidden_size == 32
    trained = load_state_dict(overfill)["model.norm.weight"]
    assert not torch.equal(trained, load_state_dict(decoder)["model.norm.weight"])

    pruned = train(config(tiny, tmp_path / "baseline", mode="pruned", steps=2))
    assert not (pruned / "overfill.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(pruned)
    assert hf.config.hidden_size == 32
    assert (pruned / "summary.json").is_file() and len(step_losses(pruned)) == 2


def test_both_modes_see_the_same_batches(tiny, tmp_path):
    runs = {mode: Trainer(config(tiny, tmp_path / mode, mode=mode, steps=3)) for mode in ("overfill", "pruned")}
    batches = {mode: list(trainer.train_loader) for mode, trainer in runs.items()}
    assert len(batches["overfill"]) == 3
    for a, b in zip(batches["overfill"], batches["pruned"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_padding_and_precision_are_logged(tiny, tmp_path):
    out = train(config(tiny, tmp_path / "out", steps=2, length_window=0))
    grouped = train(config(tiny, tmp_path / "grouped", steps=2, length_window=8))
    for run in (out, grouped):
        assert all(0 <= m["padding"] < 1 and m["precision"] == "fp32" for m in metrics(run))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp32" and "asked for" in summary["precision_reason"]
    assert summary["padding"] > json.loads((grouped / "summary.json").read_text())["padding"]


def test_bf16_training_runs_with_fp32_master_weights_and_a_bf16_full_model(tiny, tmp_path):
    trainer = Trainer(config(tiny, tmp_path / "out", steps=2, precision="bf16"))
    assert trainer.full.model.embed_tokens.weight.dtype == torch.bfloat16
    trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.decoder.parameters())
    losses = [m["loss"] for m in metrics(tmp_path / "out")]
    assert all(torch.isfinite(torch.tensor(losses)))
    reference = [m["loss"] for m in metrics(train(config(tiny, tmp_path / "fp32", steps=2)))]
    assert losses[0] == pytest.approx(reference[0], rel=0.05)  # bf16 rounding, not another loss


def test_resume_after_a_kill_mid_checkpoint_reproduces_the_loss_curve(tiny, tmp_path, monkeypatch):
    from accelerate import Accelerator

    common = dict(steps=7, checkpoint_every=3, keep=1)
    reference = train(config(tiny, tmp_path / "reference", **common))
    assert [p.name for p in checkpoint_dirs(reference)] == ["step-00000006"]  # keep=1 dropped step 3

    save_state = Accelerator.save_state

    def dies_at_step_6(self, output_dir, **kwargs):
        save_state(self, output_dir, **kwargs)  # some files written, then the process dies
        if "step-00000006" in output_dir:
            raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", dies_at_step_6)
    cfg = config(tiny, tmp_path / "killed", **common)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    out = Path(cfg.out)
    assert latest_checkpoint(out).name == "step-00000003"
    assert (out / "checkpoints" / ".tmp-step-00000006").is_dir()
    assert len(step_losses(out)) == 6 and not (out / "model.safetensors").exists()

    with pytest.raises(OverfillError, match="holds a training run: pass --resume"):
        train(cfg)
    with pytest.raises(OverfillError, match="other settings.*lr"):
        train(config(tiny, out, resume=True, **common, lr=1e-3))
    train(config(tiny, out, resume=True, **common))
    assert [m["step"] for m in metrics(out)] == list(range(1, 8))
    assert_close(step_losses(out), step_losses(reference), atol=1e-6, rtol=1e-6)
    assert_close(load_state_dict(out), load_state_dict(reference), atol=1e-6, rtol=1e-6)
    assert not (out / "checkpoints" / ".tmp-step-00000006").exists()
    train(config(tiny, out, resume=True, **common))  # finished: nothing to do, nothing changed
    assert len(step_losses(out)) == 7


def test_bad_input_fails_before_training(tiny, tmp_path):
    incompatible = save_tiny(tmp_path / "kv4", hidden_size=32, intermediate_size=48, num_key_value_heads=4,
                             num_attention_heads=4)
    out = tmp_path / "out"
    with pytest.raises(OverfillError, match="cannot read the full model's KV cache.*num_key_value_heads"):
        train(config(tiny, out, decoder=str(incompatible)))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(OverfillError, match="no usable examples"):
        train(config(tiny, out, data=str(empty)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(chat(0)) + "\n{not json\n")
    with pytest.raises(OverfillError, match="line 2: not valid JSON"):
        train(config(tiny, out, data=str(broken)))
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl",
                            [{"messages": [{"role": "user", "content": "w1 w2"}]} for _ in range(3)])
    with pytest.raises(OverfillError, match="assistant turn"):
        train(config(tiny, out, data=str(no_answer)))
    with pytest.raises(OverfillError, match="--eval-every 0"):
        train(config(tiny, out, data=str(write_jsonl(tmp_path / "few.jsonl", [chat(0)])), eval_every=5))
    with pytest.raises(OverfillError, match="--steps or --tokens, not both"):
        config(tiny, out, tokens=100)
    with pytest.raises(OverfillError, match="batch_size must be positive"):
        config(tiny, out, batch_size=0)
    assert not out.exists()


def test_cli_trains_with_a_token_budget_and_reports_errors_in_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", "--full", tiny["full"], "--decoder", tiny["pruned"], "--data", tiny["data"], "--out", str(out),
            "--mode", "pruned", "--tokens", "300", "--batch-size", "2", "--max-len", "64", "--eval-every", "0"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] >= 300 and summary["mode"] == "pruned"
    assert main(argv) == 2
    assert "holds a training run: pass --resume" in capsys.readouterr().err


def test_two_processes_stay_in_sync_and_match_one_process(tiny, tmp_path):
    """torchrun, 2 CPU processes (gloo): the same weights on both ranks, equal to a single process
    with the same global batch of 8 (the loss is normalised over the whole step's tokens)."""
    cfg = config(tiny, tmp_path / "ddp", steps=3, batch_size=2, grad_accum=2)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).parent / "ddp_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), str(tmp_path / "cfg.json"), str(tmp_path)]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:  # timed out: end the workers too, not just the launcher
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    start = load_state_dict(tiny["pruned"])
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert not torch.equal(rank0["model.norm.weight"], start["model.norm.weight"])

    single = train(config(tiny, tmp_path / "single", steps=3, batch_size=4, grad_accum=2))
    assert_close(step_losses(cfg.out), step_losses(single), atol=1e-5, rtol=1e-5)
    assert_close(load_state_dict(cfg.out), load_state_dict(single), atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_changes_nothing_but_memory(tiny, tmp_path, monkeypatch):
    plain = train(config(tiny, tmp_path / "plain", steps=2))
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    recomputed = train(config(tiny, tmp_path / "recomputed", steps=2, grad_checkpointing=True))
    assert len(calls) == 2 * 2  # two decoder layers, two steps
    assert_close(step_losses(recomputed), step_losses(plain), atol=1e-6, rtol=1e-6)
    assert_close(load_state_dict(recomputed), load_state_dict(plain), atol=1e-6, rtol=1e-5)


def test_snapshots_at_token_budgets_are_the_models_of_those_steps(tiny, tmp_path):
    out = train(config(tiny, tmp_path / "out", mode="pruned", steps=6, snapshots=[100, 250]))
    lines = metrics(out)
    for budget in (100, 250):
        snap = out / "snapshots" / f"tokens-{budget}"
        state = json.loads((snap / "snapshot.json").read_text())
        first = next(m for m in lines if m["tokens"] >= budget)  # the first step that reached the budget
        assert state["step"] == first["step"] and state["tokens"] == first["tokens"]
        assert (snap / "config.json").is_file() and not (snap / "overfill.json").exists()
    a, b = (load_state_dict(out / "snapshots" / f"tokens-{n}") for n in (100, 250))
    assert not torch.equal(a["model.norm.weight"], b["model.norm.weight"])
    overfill = train(config(tiny, tmp_path / "of", steps=3, snapshots=[50]))
    assert TwoStageModel.from_pretrained(overfill / "snapshots" / "tokens-50").is_two_stage


@pytest.mark.parametrize("resume", [False, True])
def test_out_never_overwrites_an_input_model_or_a_directory_without_a_run(tiny, tmp_path, resume):
    """The defect: --resume --out <the full model's directory> replaced its weights, with exit code 0."""
    import shutil

    full = tmp_path / "full"
    shutil.copytree(tiny["full"], full)
    before = {p.name: p.read_bytes() for p in full.iterdir()}
    for out, message in ((full, "is the --full input"), (Path(tiny["pruned"]), "is the --decoder input"),
                         (full / "sub", "inside the --full input"), (tmp_path, "holds the --full input")):
        with pytest.raises(OverfillError, match=message):
            train(config(tiny, out, full=str(full), resume=resume))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(OverfillError, match="not empty"):
        train(config(tiny, other, resume=resume))
    assert {p.name: p.read_bytes() for p in full.iterdir()} == before
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_resume_refuses_training_data_that_changed(tiny, tmp_path):
    import shutil

    data = tmp_path / "chats.jsonl"
    shutil.copy(tiny["data"], data)
    cfg = config(tiny, tmp_path / "out", data=str(data), steps=4, checkpoint_every=2)
    out = train(cfg)
    (out / "summary.json").unlink()  # as if killed after the checkpoint of step 2
    assert latest_checkpoint(out).name == "step-00000002"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same chats, another order: other batches
    with pytest.raises(OverfillError, match="training data of the run .* changed"):
        Trainer(config(tiny, tmp_path / "out", data=str(data), steps=4, checkpoint_every=2, resume=True))


def test_resume_accepts_another_spelling_of_the_same_input_path(tiny, tmp_path):
    link = tmp_path / "pruned-link"
    link.symlink_to(tiny["pruned"])
    saved = config(tiny, tmp_path / "out")
    assert config(tiny, tmp_path / "out", decoder=str(link)).changes_from(saved) == []
    assert config(tiny, tmp_path / "out", decoder=tiny["full"]).changes_from(saved) != []


@pytest.mark.parametrize("budget", [dict(steps=10**20), dict(tokens=10**20), dict(steps=10**9, batch_size=8)])
def test_a_budget_whose_plan_would_fill_the_memory_is_refused(tiny, tmp_path, budget):
    # the plan of a run is a list of example indices: a typo's extra zeros must not become one of 10**20
    with pytest.raises(OverfillError, match="would plan more than"):
        config(tiny, tmp_path / "out", **({"steps": None} | budget))
