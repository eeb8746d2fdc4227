import json

import pytest
import torch
from torch.testing import assert_close

from overfill.errors import OverfillError
from overfill.engine import decode_step, prefill
from overfill.model import ModelArgs, causal_mask, positions_from_padding
from overfill.two_stage import TwoStageModel, check_compatible, split_logits
from conftest import ours, tiny_hf_config, tiny_hf_model


def batch():
    tokens = torch.randint(3, 128, (2, 10))
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, :3] = 0
    prompt_mask = torch.zeros_like(tokens, dtype=torch.bool)
    prompt_mask[0, :6] = True
    prompt_mask[1, 3:5] = True
    return tokens, attention_mask, prompt_mask


def test_split_logits_with_decoder_equal_full_is_the_full_forward():
    full = ours(tiny_hf_model("qwen2"))
    tokens, attention_mask, prompt_mask = batch()
    logits, _ = split_logits(full, full, tokens, attention_mask, prompt_mask)
    reference = full(tokens, positions_from_padding(attention_mask),
                     causal_mask(attention_mask.bool(), torch.arange(10)))
    real = attention_mask.bool()
    assert_close(logits[real], reference[real], atol=1e-5, rtol=1e-4)


def test_split_logits_equal_prefill_then_decode_steps():
    full = ours(tiny_hf_model("llama", seed=0))
    decoder = ours(tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48))
    tokens = torch.randint(3, 128, (1, 9))
    prompt_len = 5
    prompt_mask = torch.arange(9)[None] < prompt_len
    logits, _ = split_logits(full, decoder, tokens, torch.ones_like(tokens), prompt_mask)
    cache = full.new_kv_cache(1, 9)
    steps = [prefill(full, cache, tokens[:, :prompt_len], torch.ones(1, prompt_len))]
    for t in range(prompt_len, 9):
        steps.append(decode_step(decoder, cache, tokens[:, t:t + 1], torch.tensor([[t]]), torch.tensor([t]), t + 1))
    assert_close(logits[0, prompt_len - 1:], torch.stack(steps, 1)[0], atol=1e-5, rtol=1e-4)


def test_split_logits_gradients_reach_only_the_decoder():
    full = ours(tiny_hf_model("llama", seed=0))
    decoder = ours(tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48)).train()
    tokens, attention_mask, prompt_mask = batch()
    logits, _ = split_logits(full, decoder, tokens, attention_mask, prompt_mask)
    logits[~prompt_mask].sum().backward()
    assert all(p.grad is None for p in full.parameters())
    assert all(p.grad is not None for p in decoder.parameters())


def test_compatibility_names_every_mismatch():
    full = ModelArgs.from_hf(tiny_hf_config("llama"))
    bad = ModelArgs.from_hf(tiny_hf_config("llama", num_key_value_heads=4, head_dim=8, vocab_size=100,
                                           num_hidden_layers=3))
    problems = check_compatible(full, bad)
    text = "; ".join(problems)
    for name in ("num_key_value_heads", "head_dim", "vocab_size", "num_hidden_layers"):
        assert name in text
    with pytest.raises(OverfillError, match="cannot read.*num_key_value_heads: full 2 vs decoder 4"):
        TwoStageModel(ours(tiny_hf_model("llama")), ours(tiny_hf_model("llama", num_key_value_heads=4)), None)


def test_layer_map_for_a_shallower_decoder():
    full = ModelArgs.from_hf(tiny_hf_config("llama", num_hidden_layers=4))
    shallow = ModelArgs.from_hf(tiny_hf_config("llama", num_hidden_layers=2))
    assert check_compatible(full, shallow, [0, 3]) == []
    assert "outside" in check_compatible(full, shallow, [0, 4])[0]
    assert "entries" in check_compatible(full, shallow, [0])[0]


def test_save_and_load_an_overfill_directory(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)} | {"[UNK]": 127}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", pad_token="w0")
    full_hf = tiny_hf_model("llama", seed=0)
    dec_hf = tiny_hf_model("llama", seed=1, hidden_size=32, intermediate_size=48)
    for name, hf in (("full", full_hf), ("pruned", dec_hf)):
        hf.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    model = TwoStageModel.from_refs(str(tmp_path / "full"), str(tmp_path / "pruned"))
    model.config.refresh_every = 4
    model.save_pretrained(tmp_path / "overfill", decoder_config_from=tmp_path / "pruned")
    assert json.loads((tmp_path / "overfill" / "overfill.json").read_text())["full"] == str(tmp_path / "full")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "overfill")  # the decoder, as plain HF
    assert plain.config.hidden_size == 32
    loaded = TwoStageModel.from_pretrained(tmp_path / "overfill")
    assert loaded.config.refresh_every == 4 and loaded.is_two_stage
    for a, b in zip(loaded.decoder.parameters(), model.decoder.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(OverfillError, match="no overfill.json"):
        TwoStageModel.from_pretrained(tmp_path / "pruned")


# ---------------------------------------------------------------------------- the recorded full model

@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project tree models/{full,pruned}, worked in from its root, and elsewhere/models/full: a
    full model of the same shapes and other weights, which a reference read from there would find."""
    from conftest import save_tiny

    for root, seed in ((tmp_path, 0), (tmp_path / "elsewhere", 5)):
        save_tiny(root / "models" / "full", seed=seed)
    save_tiny(tmp_path / "models" / "pruned", seed=1, hidden_size=32, intermediate_size=48)
    monkeypatch.chdir(tmp_path)
    pair = TwoStageModel.from_refs("models/full", "models/pruned")
    pair.save_pretrained("runs/overfill", decoder_config_from="models/pruned")
    return tmp_path


def test_overfill_json_records_the_full_model_relative_to_itself_with_its_fingerprint(project):
    from overfill.model import weights_fingerprint

    saved = json.loads((project / "runs" / "overfill" / "overfill.json").read_text())
    assert saved["full"] == "../../models/full"  # from runs/overfill
    assert saved["full_weights_sha256"] == weights_fingerprint(project / "models" / "full")


def test_the_recorded_full_model_is_the_same_from_any_directory(project, monkeypatch):
    monkeypatch.chdir(project / "elsewhere")  # where "models/full" is another model
    loaded = TwoStageModel.from_pretrained(project / "runs" / "overfill")
    trained_with = TwoStageModel.from_refs(str(project / "models" / "full")).full
    assert all(torch.equal(a, b) for a, b in zip(loaded.full.parameters(), trained_with.parameters()))


def test_a_full_model_other_than_the_one_trained_with_is_refused(project):
    with pytest.raises(OverfillError, match="not the full model .* was trained with"):
        TwoStageModel.from_pretrained(project / "runs" / "overfill", full=str(project / "elsewhere" / "models" / "full"))
    with pytest.raises(OverfillError, match="trained with"):
        TwoStageModel.from_refs("elsewhere/models/full", "runs/overfill")


def test_an_older_overfill_directory_still_loads_as_it_did(project):
    # Written before references were recorded relative to it: as typed, relative to the run's directory.
    (project / "runs" / "overfill" / "overfill.json").write_text(json.dumps({"full": "models/full"}))
    assert TwoStageModel.from_pretrained("runs/overfill").is_two_stage
