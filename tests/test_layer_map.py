"""A depth-pruned decoder (layer_map) end to end, through the command line and the server.

A tiny random 4-layer full model with SmolLM2's tokenizer is pruned to a 3-layer, narrower decoder
that reads the full model's layers [0, 2, 3] (`overfill prune --depth 3 --depth-method firstlast`),
trained for a few OverFill steps (`overfill train --mode overfill`), then used for generation,
evaluation and serving. The references are hand-written: the full model prefills the prompt into
a cache, and the decoder attends to layers `layer_map` of it (as a read-only prefix) plus its own
keys and values, recomputed from scratch at every step.
"""
import json
import math
import shutil
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import pytest
import torch

from overfill import data
from overfill.cli import main
from overfill.evaluate import loglikelihoods
from overfill.generate import SamplingParams, encode, generate
from overfill.model import causal_mask, load_state_dict
from overfill.two_stage import TwoStageModel
from conftest import save_tiny_dir

LAYER_MAP = [0, 2, 3]
PROMPT = "Count on from three, please."


def chat(i: int, uid: str | None = None) -> dict:
    """A learnable chat: the answer counts on from the number asked for."""
    answer = " ".join(str(i + k) for k in range(6))
    return {"id": uid or f"count-{i}", "messages": [{"role": "user", "content": f"Count on from {i}."},
                                                    {"role": "assistant", "content": answer}]}


def validation_ids(n: int) -> list[str]:
    return [f"val-{i}" for i in range(5000) if data.in_validation(f"val-{i}", 0.01)][:n]


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm2_tokenizer):
    """full (4 layers) -> pruned (3 layers, layer_map [0, 2, 3]) -> trained (an OverFill directory)."""
    root, tok = tmp_path_factory.mktemp("layer_map"), smollm2_tokenizer
    full = save_tiny_dir(root / "full", tok, seed=0, vocab_size=len(tok), num_hidden_layers=4, hidden_size=64,
                         intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    chats = root / "chats.jsonl"
    records = [chat(i) for i in range(16)] + [chat(20 + i, uid) for i, uid in enumerate(validation_ids(2))]
    chats.write_text("".join(json.dumps(r) + "\n" for r in records))
    pruned, trained = root / "pruned", root / "trained"
    assert main(["prune", str(full), "--out", str(pruned), "--depth", "3", "--depth-method", "firstlast", "--method", "select",
                 "--hidden", "0.5", "--intermediate", "0.5", "--multiple", "8", "--calibration", str(chats),
                 "--samples", "8", "--loss-samples", "4", "--seq-len", "64", "--precision", "fp32",
                 "--device", "cpu"]) == 0
    assert main(["train", "--full", str(full), "--decoder", str(pruned), "--data", str(chats), "--out", str(trained),
                 "--mode", "overfill", "--steps", "8", "--batch-size", "4", "--lr", "1e-2", "--warmup", "1",
                 "--max-len", "64", "--checkpoint-every", "4", "--eval-every", "0", "--precision", "fp32"]) == 0
    return SimpleNamespace(root=root, full=full, pruned=pruned, trained=trained, chats=chats)


def pair(world, decoder="trained") -> TwoStageModel:
    return TwoStageModel.from_refs(str(world.full), str(getattr(world, decoder)), dtype=torch.float32, device="cpu")


@torch.no_grad()
def prompt_cache(full, ids: list[int]):
    """The full model's keys and values of a prompt (one row, no padding) and its logits at every slot."""
    P = len(ids)
    cache, slots = full.new_kv_cache(1, P), torch.arange(P)
    logits = full(torch.tensor([ids]), slots[None], causal_mask(torch.ones(1, P, dtype=torch.bool), slots),
                  cache, slots, kv_len=P)
    return cache, logits[0]


@torch.no_grad()
def decoder_logits(decoder, cache, layer_map, P: int, tokens: list[int]):
    """The decoder over `tokens` at slots P.., reading layer layer_map[i] of the full cache in its layer i."""
    prefix = SimpleNamespace(k=[cache.k[j] for j in layer_map], v=[cache.v[j] for j in layer_map])
    G = len(tokens)
    slots = torch.arange(P, P + G)
    mask = causal_mask(torch.ones(1, P + G, dtype=torch.bool), slots)  # [1, 1, G, P + G]
    return decoder(torch.tensor([tokens]), slots[None], mask, prefix_kv=prefix)[0]  # [G, V]


def reference_greedy(model: TwoStageModel, ids: list[int], n: int, layer_map=LAYER_MAP) -> list[int]:
    """Greedy two-stage decoding without an incremental cache: the full model picks the first token."""
    cache, logits = prompt_cache(model.full, ids)
    out = [int(logits[-1].argmax())]
    while len(out) < n:
        out.append(int(decoder_logits(model.decoder, cache, layer_map, len(ids), out)[-1].argmax()))
    return out


def reference_logprob(model: TwoStageModel, context: list[int], continuation: list[int], layer_map=LAYER_MAP) -> float:
    cache, logits = prompt_cache(model.full, context)
    scores = logits[-1:]  # the full model predicts the first token, the decoder the rest
    if len(continuation) > 1:
        scores = torch.cat([scores, decoder_logits(model.decoder, cache, layer_map, len(context), continuation[:-1])])
    scores = scores.log_softmax(-1)  # [len(continuation), V]
    return scores.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


# ---------------------------------------------------------------------------- prune and train

def test_prune_records_the_layer_map_and_takes_those_layers(world):
    record = json.loads((world.pruned / "prune_record.json").read_text())
    assert record["layer_map"] == LAYER_MAP
    assert json.loads((world.pruned / "config.json").read_text())["num_hidden_layers"] == 3
    full, decoder = load_state_dict(world.full), load_state_dict(world.pruned)
    hidden = torch.tensor(record["kept"]["hidden"])
    for i, j in enumerate(LAYER_MAP):  # KV heads are kept whole: k_proj loses only its input channels
        key = "model.layers.{}.self_attn.k_proj.weight"
        assert torch.equal(decoder[key.format(i)], full[key.format(j)][:, hidden])


def test_training_lowers_the_loss_and_saves_a_loadable_layer_map_decoder(world, tmp_path):
    losses = [json.loads(line)["loss"] for line in (world.trained / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.5
    assert json.loads((world.trained / "overfill.json").read_text())["layer_map"] == LAYER_MAP
    loaded = TwoStageModel.from_pretrained(world.trained, device="cpu")
    assert loaded.layer_map == LAYER_MAP and loaded.decoder.args.num_hidden_layers == 3
    start, end = load_state_dict(world.pruned), load_state_dict(world.trained)
    assert start.keys() == end.keys() and not torch.equal(start["model.layers.1.mlp.up_proj.weight"],
                                                         end["model.layers.1.mlp.up_proj.weight"])
    checkpoint = world.trained / "checkpoints" / "step-00000004"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 4
    halfway = load_state_dict(checkpoint)  # the decoder after 4 of 8 steps: neither the start nor the end
    name = "model.layers.1.mlp.up_proj.weight"
    assert halfway[name].shape == end[name].shape
    assert not torch.equal(halfway[name], start[name]) and not torch.equal(halfway[name], end[name])
    resumed = shutil.copytree(world.trained, tmp_path / "halfway", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(checkpoint / "model.safetensors", resumed / "model.safetensors")
    model = TwoStageModel.from_pretrained(resumed, device="cpu")  # the checkpoint's decoder, as a layer_map pair
    ids = encode(model.tokenizer, PROMPT, chat=False)
    assert generate(model, [PROMPT], SamplingParams(6, ignore_eos=True), chat=False)[0].token_ids == \
        reference_greedy(model, ids, 6)


# ---------------------------------------------------------------------------- generate

@pytest.mark.parametrize("decoder", ["pruned", "trained"])
def test_generation_equals_a_hand_written_two_stage_loop(world, decoder, capsys):
    model = pair(world, decoder)
    assert model.layer_map == LAYER_MAP
    ids = encode(model.tokenizer, PROMPT, chat=False)
    expected = reference_greedy(model, ids, 12)
    assert reference_greedy(model, ids, 12, layer_map=[0, 1, 2]) != expected  # the map matters
    completion = generate(model, [PROMPT], SamplingParams(12, ignore_eos=True), chat=False)[0]
    assert completion.token_ids == expected
    eos = [i for i, t in enumerate(expected) if t in model.eos_token_ids]
    text = generate(model, [PROMPT], SamplingParams(12), chat=False)[0].text
    capsys.readouterr()
    assert main(["generate", PROMPT, "--full", str(world.full), "--decoder", str(getattr(world, decoder)),
                 "--raw", "--max-new-tokens", "12", "--device", "cpu", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out == text + "\n"
    if not eos:
        assert text == model.tokenizer.decode(expected, skip_special_tokens=True).removesuffix("\ufffd")


# ---------------------------------------------------------------------------- eval

def test_overfill_loglikelihoods_equal_the_hand_written_reference(world):
    model = pair(world)
    tok = model.tokenizer
    requests = [(tok("The capital of France is")["input_ids"], tok(" Paris, of course.")["input_ids"]),
                (tok("One, two,")["input_ids"], tok(" three")["input_ids"])]
    got = [lp for lp, _ in loglikelihoods(model, "overfill", requests)]
    expected = [reference_logprob(model, c, x) for c, x in requests]
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert reference_logprob(model, *requests[0], layer_map=[0, 1, 2]) != pytest.approx(expected[0], rel=1e-3)


def test_eval_command_writes_finite_overfill_scores(world, tmp_path):
    out = tmp_path / "results.json"
    assert main(["eval", "--full", str(world.full), "--decoder", str(world.trained), "--mode", "overfill",
                 "--tasks", "arc_easy,lambada", "--limit", "2", "--chat-examples", "2", "--chat-source",
                 str(world.chats), "--chat-max-new-tokens", "4", "--precision", "fp32", "--device", "cpu",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["mode"] == "overfill" and record["models"]["layer_map"] == LAYER_MAP
    scores = [record["tasks"]["arc_easy"]["acc"], record["tasks"]["lambada"]["acc"],
              record["tasks"]["lambada"]["perplexity"], record["chat"]["top1_agreement"]]
    assert all(math.isfinite(s) for s in scores) and record["tasks"]["lambada"]["perplexity"] > 1
    assert record["tasks"]["arc_easy"]["samples"] == 2 and record["chat"]["examples"] == 2


# ---------------------------------------------------------------------------- serve

@contextmanager
def serving(app):
    """The app under uvicorn on 127.0.0.1 (a free port), in a background thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_server_answers_as_generate_does(world):
    from overfill.serve import create_app

    model = pair(world)
    messages = [{"role": "user", "content": PROMPT}]
    text = generate(model, [PROMPT], SamplingParams(10), chat=False)[0].text
    chat_text = generate(model, [messages], SamplingParams(10))[0].text
    assert text != chat_text  # the two requests are told apart
    with serving(create_app(model, "tiny")) as base:
        reply = httpx.post(base + "/v1/completions", timeout=30, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}).json()
        assert reply["choices"][0]["text"] == text
        reply = httpx.post(base + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0}).json()
        assert reply["choices"][0]["message"]["content"] == chat_text
