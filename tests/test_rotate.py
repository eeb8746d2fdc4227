"""`overfill prune --method rotate`: folding the norms and rotating the residual stream (overfill/rotate.py)."""
import json

import pytest
import torch
from torch.testing import assert_close

from conftest import ours
from overfill.cli import main
from overfill.model import ModelArgs, load_model
from overfill.prune import PruneConfig, PruneRecord, prune, prune_model
from overfill.rotate import fold_norms, norms, rotate
from overfill.two_stage import TwoStageModel, check_compatible
from test_prune import ARCHITECTURES, TEXTS, load, logits, model_dir, tiny_tokenizer, wide_model, with_dead_channels

ROTATE = PruneConfig(method="rotate", precision="fp32", multiple=8)
TIGHT = dict(atol=2e-5, rtol=1e-5)


def random_norms(hf):
    """Norm weights far from 1 and biases far from 0 (ones and zeros at init), so that a wrong fold or rotation shows."""
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.3, 2.0)
            elif name.endswith("bias"):
                param.normal_(0, 0.3)
    return hf


def random_rotation(d: int, seed: int = 0) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))[0]


def variant(arch: str) -> dict:
    """Tied embeddings on two architectures; Llama with attention biases (o_proj's bias is rotated too)."""
    return {"tie_word_embeddings": arch in ("llama", "qwen3"), "attention_bias": arch == "llama"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_the_norms_alone_keeps_the_logits(arch):
    hf = random_norms(wide_model(arch, **variant(arch)))
    model = ours(hf)
    fold_norms(model)
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for n in norms(model))
    assert_close(logits(model), logits(hf), **TIGHT)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_rotation_keeps_the_logits(arch):
    hf = random_norms(wide_model(arch, **variant(arch)))
    model = ours(hf).fuse_projections()  # fused buffers are rebuilt from the rotated weights
    fold_norms(model)
    rotate(model, random_rotation(64))
    assert_close(logits(model), logits(hf), **TIGHT)
    assert not model.args.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight


def test_rotating_before_folding_is_refused():
    model = ours(random_norms(wide_model()))
    with pytest.raises(ValueError, match="fold the norms"):
        rotate(model, random_rotation(64))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rotate_without_slicing_keeps_the_logits(arch):
    # D' = D: fold, the principal rotation of the calibration stream, plain norm weights of 1
    hf = random_norms(wide_model(arch, **variant(arch)))
    model = ours(hf)
    record = prune_model(model, tiny_tokenizer(), ROTATE, TEXTS)
    assert record.method["name"] == "rotate" and record.method["energy_kept"] == pytest.approx(1)
    assert record.params_after == record.params_before + (64 * 128 if hf.config.tie_word_embeddings else 0)
    assert_close(logits(model), logits(hf), **TIGHT)
    assert record.calibration["loss_after"] == pytest.approx(record.calibration["loss_before"], abs=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_stream_in_a_rotated_subspace_is_cut_to_it_exactly(arch):
    """The residual stream spans 48 of 64 dimensions, in directions that no channel selection finds (a random
    rotation of 16 dead channels): the rotated cut to 48 must find them and compute what the full model does.
    The kept share of the stream's energy is 1, so the norm weights sqrt(64 / 48) are exact."""
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:16]
    hf = with_dead_channels(random_norms(wide_model(arch, rms_norm_eps=1e-12, **variant(arch))), dead)
    expected = logits(hf)
    model = ours(hf)
    fold_norms(model)
    rotate(model, random_rotation(64, seed=3))  # no channel is dead any more
    record = prune_model(model, tiny_tokenizer(), PruneConfig(hidden=48, method="rotate", precision="fp32",
                                                               multiple=8), TEXTS)
    assert model.args.hidden_size == 48 and record.method["energy_kept"] == pytest.approx(1, abs=1e-6)
    assert record.method["energy_kept_by_select"] < 0.95
    assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rotated_cut_loads_in_transformers_and_reads_the_full_models_cache(tmp_path, arch):
    full = random_norms(wide_model(arch, **variant(arch)))
    full_dir = model_dir(tmp_path, full)
    cfg = PruneConfig(hidden=0.5, intermediate=0.5, heads=0.5, depth=3, method="rotate", multiple=8, precision="fp32")
    record = prune(full_dir, cfg, tmp_path / "out", texts=TEXTS)

    decoder, ours_loaded = load(tmp_path / "out"), load_model(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"],
            config["num_hidden_layers"]) == (32, 48, 4, 3)
    assert config["tie_word_embeddings"] is False and decoder.lm_head.weight is not decoder.model.embed_tokens.weight
    assert_close(logits(decoder), logits(ours_loaded), atol=1e-5, rtol=1e-4)
    for layer, source in zip(decoder.model.layers, record.layer_map):  # keys and values: every head, full size
        full_attn = full.model.layers[source].self_attn
        assert layer.self_attn.k_proj.weight.shape == (full_attn.k_proj.weight.shape[0], 32)
        assert layer.self_attn.v_proj.weight.shape == (full_attn.v_proj.weight.shape[0], 32)
    assert check_compatible(ModelArgs.from_hf(full.config), ModelArgs.from_hf(config), record.layer_map) == []
    assert TwoStageModel.from_refs(str(full_dir), str(tmp_path / "out")).layer_map == record.layer_map

    saved = PruneRecord.load(tmp_path / "out")
    assert saved == record and saved.method["name"] == "rotate" and saved.method["why"].startswith("rotate (the default)")
    assert saved.kept["hidden"] == list(range(32))
    assert 0 < saved.method["energy_kept"] <= 1 and len(saved.method["norm_weights"]) == 2 * 4 + 1
    assert json.loads((tmp_path / "out" / "prune_config.json").read_text())["method"] == "rotate"


def test_cli_method_flag(tmp_path, capsys):
    full_dir = model_dir(tmp_path, random_norms(wide_model(tie_word_embeddings=True)))
    argv = ["prune", str(full_dir), "--out", str(tmp_path / "out"), "--hidden", "0.5", "--multiple", "8",
            "--method", "rotate", "--samples", "4", "--seq-len", "32"]
    assert main(argv) == 0
    assert "rotate" in capsys.readouterr().out
    assert PruneRecord.load(tmp_path / "out").method["name"] == "rotate"
    assert load(tmp_path / "out").config.tie_word_embeddings is False


def test_select_leaves_a_tied_model_tied(tmp_path):
    full_dir = model_dir(tmp_path, wide_model(tie_word_embeddings=True))
    record = prune(full_dir, PruneConfig(hidden=0.5, method="select", multiple=8), tmp_path / "out", texts=TEXTS)
    pruned = load(tmp_path / "out")
    assert record.method["why"].startswith("select (asked for with --method select)")
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


@pytest.mark.slow
def test_rotate_smollm2_keeps_more_than_select(tmp_path, smollm2_dir):
    losses = {}
    for method in ("select", "rotate"):
        cfg = PruneConfig(hidden=0.45, intermediate=0.45, samples=16, loss_samples=8, seq_len=128, method=method)
        losses[method] = prune(smollm2_dir, cfg, tmp_path / method).calibration["loss_after"]
    assert losses["rotate"] < losses["select"] - 0.5, losses
    decoder = load(tmp_path / "rotate")
    assert decoder.config.hidden_size == 288 and decoder.config.tie_word_embeddings is False
    assert decoder.lm_head.weight is not decoder.model.embed_tokens.weight
    assert check_compatible(ModelArgs.from_hf(load(smollm2_dir).config), ModelArgs.from_hf(decoder.config), None) == []
