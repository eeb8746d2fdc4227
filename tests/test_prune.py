import copy
import json
import string

import pytest
import torch
from torch.testing import assert_close

from conftest import ours, tiny_hf_config, tiny_hf_model
from overfill.cli import main
from overfill.errors import OverfillError
from overfill.hub import load_tokenizer
from overfill.model import ModelArgs, Transformer, causal_mask, load_model
from overfill.prune import CONFIG_FILE, RECORD_FILE, PruneConfig, PruneRecord, plan, prune, prune_model
from overfill.two_stage import TwoStageModel, check_compatible
from test_model import ARCHS

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3"]
TEXTS = [f"Sample {i}: the quick brown fox jumps over the lazy dog, {i * 7} times!" * (1 + i % 3) for i in range(10)]
EXACT = PruneConfig(method="select", precision="fp32", multiple=8)  # tiny widths: a small multiple


def tiny_tokenizer():
    """Character-level tokenizer of 75 ids, small enough for the tiny configs' 128-token vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " .,!?:'-\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def model_dir(tmp_path, model, name="full"):
    path = tmp_path / name
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def wide_model(arch="llama", **overrides):
    """Tiny model with 4 query heads per KV head, so that heads can be pruned inside a group."""
    return tiny_hf_model(arch, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4, **overrides)


def logits(model, tokens=torch.arange(4, 40).view(2, 18)):
    """[B, T, V] of a transformers model or of our Transformer."""
    with torch.no_grad():
        if isinstance(model, Transformer):
            slots = torch.arange(tokens.shape[1])
            return model(tokens, slots.expand_as(tokens), causal_mask(torch.ones_like(tokens, dtype=torch.bool), slots))
        return model(input_ids=tokens).logits


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------- planning widths

def smollm2_like():
    return tiny_hf_config("llama", vocab_size=128, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def test_plan_default_rounding_allows_widths_between_the_head_multiples():
    # the default multiple is 16: hidden widths step by lcm(16, 9 heads) = 144, so 432 lies between 288 and 576
    for ratio, hidden in ((0.15, 432), (0.25, 432), (0.35, 432), (0.45, 288), (0.5, 288)):
        pruning = plan(smollm2_like(), PruneConfig(hidden=ratio, intermediate=ratio))
        assert pruning.pruned.hidden_size == hidden and pruning.rounding["hidden"].multiple == 144, ratio
        assert pruning.pruned.intermediate_size % 16 == 0
    assert plan(smollm2_like(), PruneConfig(hidden=0.45, intermediate=0.45)).pruned.intermediate_size == 848


def test_plan_rounds_to_the_multiple_and_a_multiple_of_the_heads():
    pruning = plan(smollm2_like(), PruneConfig(hidden=0.45, intermediate=0.45, multiple=64))
    # 576 * 0.55 = 316.8; lcm(64, 9) = 576 leaves no smaller width, lcm(32, 9) = 288 does
    assert pruning.pruned.hidden_size == 288
    assert pruning.rounding["hidden"].multiple == 288 and "32" in pruning.rounding["hidden"].note
    assert pruning.pruned.intermediate_size == 832  # 1536 * 0.55 = 844.8 -> 13 * 64
    assert pruning.pruned.num_attention_heads == 9 and pruning.pruned.head_dim == 64
    config = smollm2_like()
    config.hidden_size = pruning.pruned.hidden_size
    config.validate_architecture()  # transformers accepts the pruned Llama config


def test_plan_absolute_widths_heads_and_depth():
    pruning = plan(smollm2_like(), PruneConfig(hidden=432, intermediate=1024, heads=6, depth=0.2, multiple=64))
    assert pruning.pruned.hidden_size == 384  # the nearest multiple of lcm(64, 6 kept heads) = 192
    assert pruning.rounding["hidden"].target == 432 and pruning.rounding["hidden"].multiple == 192
    assert pruning.pruned.intermediate_size == 1024
    assert pruning.pruned.num_attention_heads == 6 and pruning.pruned.num_key_value_heads == 3
    assert pruning.pruned.num_hidden_layers == 24
    assert plan(smollm2_like(), PruneConfig(hidden=432, heads=6, multiple=1)).pruned.hidden_size == 432


def test_plan_pruning_heads_alone_keeps_hidden_a_multiple_of_them():
    config = tiny_hf_config("llama", hidden_size=896, num_attention_heads=14, num_key_value_heads=2, head_dim=64)
    pruning = plan(config, PruneConfig(heads=12))
    assert pruning.pruned.num_attention_heads == 12 and pruning.pruned.hidden_size == 888


def test_plan_removing_nothing_keeps_every_width():
    config = smollm2_like()
    pruning = plan(config, PruneConfig())
    assert pruning.pruned == pruning.full
    assert all(r.note == "not pruned" for r in pruning.rounding.values())


@pytest.mark.parametrize("flags, message", [
    (dict(hidden=-0.1), "fraction to remove"),
    (dict(hidden=1.5), "whole number"),
    (dict(intermediate=float("nan")), "fraction to remove"),
    (dict(hidden=1000), "larger than the model's 576"),
    (dict(heads=12), "larger than the model's 9"),
    (dict(depth=31), "larger than the model's 30"),
    (dict(multiple=0), "--multiple"),
    (dict(seq_len=1), "--seq-len"),
])
def test_plan_rejects_bad_flags(flags, message):
    with pytest.raises(OverfillError, match=message):
        plan(smollm2_like(), PruneConfig(**flags))


def test_plan_rejects_an_unsupported_architecture():
    from transformers import GPT2Config

    with pytest.raises(OverfillError, match="unsupported architecture 'gpt2'"):
        plan(GPT2Config(n_embd=64, n_layer=2, n_head=4), PruneConfig(hidden=0.5))


# ---------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_removing_nothing_gives_bit_identical_logits(tmp_path, arch):
    full = tiny_hf_model(arch, tie_word_embeddings=arch == "qwen2")
    record = prune(model_dir(tmp_path, full), EXACT, tmp_path / "out", texts=TEXTS)
    pruned = load(tmp_path / "out")
    assert torch.equal(logits(pruned), logits(full))
    assert record.params_after == record.params_before and record.layer_map is None
    assert record.calibration["loss_after"] == record.calibration["loss_before"]


def with_dead_channels(full, dead: torch.Tensor):
    """The model with hidden channels `dead` zero all along the residual stream."""
    model = copy.deepcopy(full)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in model.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight[dead] = 0
                if proj.bias is not None:
                    proj.bias[dead] = 0
    return model


def reference_with_zeros(full, kept: dict, head_dim: int):
    """What the pruned model must compute, written as the full model with parts zeroed.

    Removing a neuron or head is exactly zeroing its column of down_proj / o_proj, removing a
    block is exactly making its residual branches zero, and removing hidden channels that are
    zero all along the stream only changes RMSNorm's mean over D channels into one over D'
    (so the norms' weights are scaled by sqrt(D' / D)).
    """
    reference = copy.deepcopy(full)
    layers = reference.model.layers
    scale = (len(kept["hidden"]) / full.config.hidden_size) ** 0.5
    with torch.no_grad():
        reference.model.norm.weight *= scale
        for i, layer in enumerate(layers):
            layer.input_layernorm.weight *= scale
            layer.post_attention_layernorm.weight *= scale
            if i not in kept["layers"]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
                continue
            j = kept["layers"].index(i)
            neurons = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
            neurons[kept["intermediate"][j]] = False
            layer.mlp.down_proj.weight[:, neurons] = 0
            heads = torch.ones(layer.self_attn.o_proj.in_features // head_dim, dtype=torch.bool)
            heads[kept["heads"][j]] = False
            layer.self_attn.o_proj.weight[:, heads.repeat_interleave(head_dim)] = 0
    return reference


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruning_every_dimension_equals_zeroing_what_is_removed(arch):
    dead = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:16]
    full = with_dead_channels(wide_model(arch, rms_norm_eps=1e-12, tie_word_embeddings=arch == "qwen3"), dead)
    with torch.no_grad():  # Qwen3's q_norm / k_norm (ones at init) must survive head pruning as they are
        for name, param in full.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
    pruned = ours(full)
    cfg = PruneConfig(hidden=48, intermediate=0.5, heads=0.5, depth=0.25, multiple=8, precision="fp32",
                      method="select")
    record = prune_model(pruned, tiny_tokenizer(), cfg, TEXTS)
    assert sorted(set(range(64)) - set(record.kept["hidden"])) == sorted(dead.tolist())
    assert record.pruned["num_attention_heads"] == 4 and record.pruned["num_hidden_layers"] == 3
    assert len(record.layer_map) == 3 and record.layer_map == record.kept["layers"]
    reference = reference_with_zeros(full, record.kept, full.config.head_dim)
    assert_close(logits(pruned), logits(reference), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruned_model_loads_with_plain_transformers_and_two_stage(tmp_path, arch):
    full = wide_model(arch, tie_word_embeddings=arch in ("qwen2", "qwen3"))
    full_dir = model_dir(tmp_path, full)
    in_memory = ours(full)
    cfg = PruneConfig(hidden=0.5, intermediate=0.5, heads=0.5, depth=3, multiple=8, precision="fp32",
                      method="select")
    expected = prune_model(in_memory, load_tokenizer(full_dir), cfg, TEXTS)  # as prune() tokenizes
    record = prune(full_dir, cfg, tmp_path / "out", texts=TEXTS)

    pruned = load(tmp_path / "out")
    assert (pruned.config.hidden_size, pruned.config.intermediate_size, pruned.config.num_attention_heads,
            pruned.config.num_key_value_heads, pruned.config.head_dim, pruned.config.num_hidden_layers) == (32, 48, 4, 2, 16, 3)
    assert_close(logits(pruned), logits(in_memory))
    assert record.kept == expected.kept
    if full.config.tie_word_embeddings:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (full_dir / "tokenizer.json").read_bytes()

    decoder_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert check_compatible(ModelArgs.from_hf(full.config), ModelArgs.from_hf(decoder_config), record.layer_map) == []
    two_stage = TwoStageModel.from_refs(str(full_dir), str(tmp_path / "out"))
    assert two_stage.layer_map == record.layer_map and len(record.layer_map) == 3


def test_qwen2_config_without_head_dim_gets_it_written(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    assert "head_dim" not in config.to_dict()  # implied: 64 // 4 = 16
    full = AutoModelForCausalLM.from_config(config)
    prune(model_dir(tmp_path, full), PruneConfig(hidden=0.5, multiple=8), tmp_path / "out", texts=TEXTS)
    pruned = load(tmp_path / "out")
    assert pruned.config.hidden_size == 32 and pruned.config.head_dim == 16
    assert check_compatible(ModelArgs.from_hf(full.config), ModelArgs.from_hf(pruned.config), None) == []


def test_record_and_config_are_saved(tmp_path):
    cfg = PruneConfig(hidden=0.5, intermediate=0.5, multiple=8, samples=6)  # bf16 calibration, fp32 weights
    record = prune(model_dir(tmp_path, tiny_hf_model()), cfg, tmp_path / "out", texts=TEXTS)
    saved = PruneRecord.load(tmp_path / "out")
    assert saved == record
    assert PruneConfig(**json.loads((tmp_path / "out" / CONFIG_FILE).read_text())) == cfg
    assert record.calibration["sequences"] == 6 and record.calibration["tokens"] > 0
    assert record.params_after < record.params_before and record.bytes_after == 4 * record.params_after
    assert len(record.kept["hidden"]) == 32 and all(len(n) == 48 for n in record.kept["intermediate"])
    assert record.kept["hidden"] == sorted(record.kept["hidden"])
    assert 0 < record.importance["hidden_kept_share"] <= 1
    assert record.rounding["hidden"]["kept"] == 32 and record.layer_map is None


WIDTH_KEYS = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "layer_types", "dtype"}


@pytest.mark.parametrize("method", ["select", "rotate"])
@pytest.mark.parametrize("arch,overrides", ARCHS)
def test_pruned_directory_gives_the_same_logits_in_transformers_and_ours(tmp_path, arch, overrides, method):
    full_dir = model_dir(tmp_path, tiny_hf_model(arch, **overrides))
    cfg = PruneConfig(hidden=0.5, intermediate=0.5, heads=0.5, depth=0.5, multiple=8, precision="fp32",
                      method=method)
    prune(full_dir, cfg, tmp_path / "out", texts=TEXTS)
    ours_loaded = load_model(tmp_path / "out")
    args = ours_loaded.args
    assert (args.hidden_size, args.intermediate_size, args.num_attention_heads, args.num_hidden_layers) == (32, 48, 2, 1)
    assert_close(logits(load(tmp_path / "out")), logits(ours_loaded), atol=1e-5, rtol=1e-4)
    source = json.loads((full_dir / "config.json").read_text())
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    changed = WIDTH_KEYS | ({"tie_word_embeddings"} if method == "rotate" else set())  # rotate unties
    assert {k: v for k, v in written.items() if k not in changed} == {
        k: v for k, v in source.items() if k not in changed}
    assert written["tie_word_embeddings"] == (source["tie_word_embeddings"] and method == "select")
    files = {p.name for p in full_dir.iterdir()}  # config, generation config, weights, tokenizer
    assert {p.name for p in (tmp_path / "out").iterdir()} == files | {CONFIG_FILE, RECORD_FILE}


def test_a_fused_model_is_pruned_like_an_unfused_one_without_stale_buffers():
    hf = wide_model("qwen2")  # q/k/v biases: the fused bias is sliced too
    plain, fused = ours(hf), ours(hf).fuse_projections()
    cfg = PruneConfig(hidden=0.5, intermediate=0.5, heads=0.5, multiple=8, precision="fp32")
    kept = prune_model(plain, tiny_tokenizer(), cfg, TEXTS).kept
    assert prune_model(fused, tiny_tokenizer(), cfg, TEXTS).kept == kept
    for layer in fused.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.fused_weight.shape == (4 * 16 + 2 * 2 * 16, 32) and attn.fused_bias.shape == (4 * 16 + 2 * 2 * 16,)
        assert attn.q_proj.weight.data_ptr() == attn.fused_weight.data_ptr()  # the parameters are views of it again
        assert mlp.fused_weight.shape == (2 * 48, 32) and mlp.gate_proj.weight.data_ptr() == mlp.fused_weight.data_ptr()
    assert_close(logits(fused), logits(plain))  # no_grad: the fused products


HOT_PATH = """
import sys
from pathlib import Path
from overfill.model import ModelArgs, Transformer
from overfill.prune import PruneConfig, _save, prune_model
args = ModelArgs(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
def tokenize(texts, truncation, max_length):
    return {"input_ids": [[ord(c) % 128 for c in t][:max_length] for t in texts]}
model, cfg = Transformer(args), PruneConfig(hidden=0.5, multiple=8, precision="fp32", device="cpu")
record = prune_model(model, tokenize, cfg, ["some calibration text"] * 4)
out = Path(sys.argv[1])
_save(model, out, {"model_type": "llama"}, cfg, record, out / "pruned")
assert (out / "pruned" / "model.safetensors").is_file()
assert "transformers" not in sys.modules, "transformers was imported"
"""


def test_pruning_and_saving_do_not_import_transformers(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HOT_PATH, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------- importance

def test_planted_hidden_channels():
    model = tiny_hf_model("llama")
    strong, dead = 5, 9
    with torch.no_grad():
        model.model.embed_tokens.weight[:, strong] = 3.0
        norms = [model.model.norm] + [n for l in model.model.layers for n in (l.input_layernorm, l.post_attention_layernorm)]
        for norm in norms:
            norm.weight[strong] *= 10
            norm.weight[dead] = 0
    cfg = PruneConfig(hidden=48, multiple=8, precision="fp32", method="select")
    record = prune_model(ours(model), tiny_tokenizer(), cfg, TEXTS)
    assert strong in record.kept["hidden"] and dead not in record.kept["hidden"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_planted_mlp_neurons(arch):
    model = tiny_hf_model(arch)
    strong, dead = 3, 7
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[strong] *= 10
        mlp.up_proj.weight[strong] = mlp.gate_proj.weight[strong]  # silu(z) * z > 0: a large positive activation
        mlp.up_proj.weight[dead] = 0
    record = prune_model(ours(model), tiny_tokenizer(), PruneConfig(intermediate=0.75, multiple=8, precision="fp32"),
                         TEXTS)
    assert strong in record.kept["intermediate"][0] and dead not in record.kept["intermediate"][0]


def test_planted_attention_heads():
    """On text 'abab...' with embedding(b) = -embedding(a), layer 0's values alternate in sign
    (no biases), so a head that attends evenly averages them to ~0 while a head that attends
    sharply to its own token keeps their full norm."""
    model = wide_model("llama")
    tokenizer = tiny_tokenizer()
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    strong, dead = 1, 2  # both in KV group 0 (heads 0..3)
    attn, head_dim = model.model.layers[0].self_attn, model.config.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight[b] = -model.model.embed_tokens.weight[a]
        q = attn.q_proj.weight.view(8, head_dim, -1)  # [H, head_dim, D]
        q[strong] = 50 * attn.k_proj.weight.view(2, head_dim, -1)[0]  # q = 50 k: attends to its own token
        q[dead] = 0  # uniform attention
    texts = ["ab" * (8 + i) for i in range(8)]
    record = prune_model(ours(model), tokenizer, PruneConfig(heads=0.5, precision="fp32"), texts)
    heads = record.kept["heads"][0]
    assert len(heads) == 4 and sum(h < 4 for h in heads) == 2  # two per KV group
    assert strong in heads and dead not in heads
    scores = record.importance["head_importance"][0]
    assert scores[strong] > 5 * scores[dead]


def test_cosine_depth_pruning_drops_the_block_that_changes_nothing(tmp_path):
    model = wide_model("qwen3")
    with torch.no_grad():  # block 2 becomes the identity: cosine(input, output) = 1
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    record = prune(model_dir(tmp_path, model), PruneConfig(depth=3, precision="fp32"), tmp_path / "out",
                   texts=TEXTS)
    assert record.layer_map == [0, 1, 3] and record.importance["block_importance"][2] == pytest.approx(0, abs=1e-6)
    assert json.loads((tmp_path / "out" / RECORD_FILE).read_text())["layer_map"] == [0, 1, 3]
    assert load(tmp_path / "out").config.layer_types == ["full_attention"] * 3


@pytest.mark.parametrize("method, layers", [("first", [0, 1]), ("last", [2, 3]), ("firstlast", [0, 3])])
def test_depth_by_position(method, layers):
    record = prune_model(ours(wide_model()), tiny_tokenizer(), PruneConfig(depth=0.5, depth_method=method), TEXTS)
    assert record.layer_map == layers


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("texts", [[], ["", "   \n"]])
def test_empty_calibration_data_is_an_error(texts):
    with pytest.raises(OverfillError, match="calibration"):
        prune_model(ours(tiny_hf_model()), tiny_tokenizer(), PruneConfig(hidden=0.5), texts)


def test_an_existing_output_directory_is_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OverfillError, match="not empty"):
        prune(model_dir(tmp_path, tiny_hf_model()), PruneConfig(hidden=0.5), out, texts=TEXTS)
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_a_previous_prune_output(tmp_path):
    full_dir, out = model_dir(tmp_path, tiny_hf_model()), tmp_path / "out"
    prune(full_dir, PruneConfig(hidden=0.5), out, texts=TEXTS)
    record = prune(full_dir, PruneConfig(hidden=0.25, multiple=8), out, texts=TEXTS, overwrite=True)
    assert load(out).config.hidden_size == record.pruned["hidden_size"] == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([full_dir.name, "out"])  # nothing left beside it


def test_cli_reports_bad_flags_in_one_line(tmp_path, capsys):
    full_dir = model_dir(tmp_path, tiny_hf_model())
    assert main(["prune", str(full_dir), "--out", str(tmp_path / "out"), "--hidden", "1.5"]) == 2
    assert "whole number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_prunes_with_a_local_calibration_file(tmp_path, capsys):
    full_dir = model_dir(tmp_path, tiny_hf_model())
    data = tmp_path / "calibration.txt"
    data.write_text("\n\n".join(TEXTS))
    argv = ["prune", str(full_dir), "--out", str(tmp_path / "out"), "--hidden", "0.5", "--intermediate", "0.5",
            "--multiple", "8", "--calibration", str(data), "--samples", "4", "--seq-len", "32"]
    assert main(argv) == 0
    assert "importance from 4 sequences" in capsys.readouterr().out
    assert load(tmp_path / "out").config.hidden_size == 32


# ---------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_prune_smollm2(tmp_path, smollm2_dir):
    cfg = PruneConfig(hidden=0.45, intermediate=0.45, samples=8, seq_len=64, method="select")
    record = prune(smollm2_dir, cfg, tmp_path / "out", texts=TEXTS)
    assert (record.pruned["hidden_size"], record.pruned["intermediate_size"]) == (288, 848)
    assert record.pruned["num_attention_heads"] == 9 and record.layer_map is None
    assert record.params_after < 0.5 * record.params_before
    cal = record.calibration
    assert cal["sequences"] == 8 and cal["loss_before"] < cal["loss_after"] < 20
    pruned = load(tmp_path / "out")
    assert pruned.config.hidden_size == 288 and pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert check_compatible(ModelArgs.from_hf(load(smollm2_dir).config), ModelArgs.from_hf(pruned.config), None) == []
