"""`overfill generate`'s flags, through `overfill.cli.main`, on a tiny random pair with SmolLM2's tokenizer.

The reference for each run is `overfill.generate.generate` (or `stream`) called with what the flags
should mean, on the same pair loaded the same way.
"""
import sys

import pytest
import torch

from overfill.cli import main
from overfill.generate import SamplingParams, generate, stream
from overfill.two_stage import TwoStageModel
from conftest import save_tiny_dir

PROMPT = "Name three colours."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, smollm2_tokenizer):
    tok, root = smollm2_tokenizer, tmp_path_factory.mktemp("generate_cli")
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    full = save_tiny_dir(root / "full", tok, seed=0, **shape)
    decoder = save_tiny_dir(root / "decoder", tok, seed=1, **(shape | dict(hidden_size=16, intermediate_size=32)))
    return str(full), str(decoder)


@pytest.fixture(scope="module")
def model(dirs):
    return TwoStageModel.from_refs(*dirs, dtype=torch.float32, device="cpu")


@pytest.fixture
def cli(dirs, capsys):
    """Run `overfill generate PROMPT --full F --decoder D *flags`; its standard output."""
    def run(*flags, prompt=PROMPT):
        capsys.readouterr()
        assert main(["generate", prompt, "--full", dirs[0], "--decoder", dirs[1], "--device", "cpu",
                     "--precision", "fp32", *flags]) == 0
        return capsys.readouterr().out

    return run


def text(model, prompt=PROMPT, chat=True, refresh_every=None, **params):
    return generate(model, [prompt], SamplingParams(**({"max_new_tokens": 8} | params)), chat=chat,
                    refresh_every=refresh_every)[0].text


def test_chat_and_raw_prompts(cli, model):
    chat, raw = text(model), text(model, chat=False)
    assert chat != raw  # the chat template is applied without --raw, not with it
    assert cli("--max-new-tokens", "8") == chat + "\n"
    assert cli("--max-new-tokens", "8", "--raw") == raw + "\n"


def test_system_message_goes_before_the_prompt(cli, model):
    messages = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": PROMPT}]
    with_system = text(model, messages)
    assert with_system != text(model)
    assert cli("--max-new-tokens", "8", "--system", "Answer in French.") == with_system + "\n"


def test_max_new_tokens_bounds_the_completion(cli, model):
    short = generate(model, [PROMPT], SamplingParams(3, ignore_eos=True))[0]
    long = generate(model, [PROMPT], SamplingParams(9, ignore_eos=True))[0]
    assert long.token_ids[:3] == short.token_ids and len(long.token_ids) == 9
    assert cli("--max-new-tokens", "3") == text(model, max_new_tokens=3) + "\n"
    assert cli("--max-new-tokens", "9") == text(model, max_new_tokens=9) + "\n"


def test_seeded_sampling_repeats_and_another_seed_differs(cli, model):
    flags = ("--max-new-tokens", "12", "--temperature", "1.5")
    first = cli(*flags, "--seed", "7")
    assert first == cli(*flags, "--seed", "7") == text(model, max_new_tokens=12, temperature=1.5, seed=7) + "\n"
    assert cli(*flags, "--seed", "8") != first
    assert first != cli("--max-new-tokens", "12")  # not greedy


def test_stop_string_cuts_the_text_before_it(cli, model):
    full_text = text(model, max_new_tokens=16)
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 2]
    cut = full_text[:full_text.find(stop)]
    assert stop.strip() and cut and cut != full_text
    assert cli("--max-new-tokens", "16", "--stop", stop) == cut + "\n"


def test_stop_strings_before_the_prompt_leave_it_the_prompt(dirs, model, capsys):
    # --stop takes several values: the last value before the end is the prompt, as a user means it
    full_text = text(model, max_new_tokens=16)
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 2]
    argv = ["generate", "--full", dirs[0], "--decoder", dirs[1], "--device", "cpu", "--max-new-tokens", "16",
            "--precision", "fp32"]
    capsys.readouterr()
    assert main(argv + ["--stop", "never said", stop, PROMPT]) == 0
    assert capsys.readouterr().out == full_text[:full_text.find(stop)] + "\n"


def test_stream_writes_pieces_that_join_to_the_text(cli, model, monkeypatch):
    expected = "".join(stream(model, PROMPT, SamplingParams(10)))
    assert expected == text(model, max_new_tokens=10)
    writes = []
    real = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: writes.append(s) or real(s))
    assert cli("--max-new-tokens", "10", "--stream") == expected + "\n"
    assert len([w for w in writes if w.strip()]) > 2  # piece by piece, not the text at once


def test_refresh_every_lets_the_full_model_reprocess(cli, model):
    plain, refreshed = text(model, max_new_tokens=12, refresh_every=0), text(model, max_new_tokens=12, refresh_every=2)
    assert plain != refreshed
    assert cli("--max-new-tokens", "12", "--refresh-every", "0") == plain + "\n"
    assert cli("--max-new-tokens", "12", "--refresh-every", "2") == refreshed + "\n"


def test_precision_fp32_and_bf16(cli, dirs, monkeypatch):
    from overfill import two_stage

    loaded, real = [], two_stage.TwoStageModel.from_refs
    monkeypatch.setattr(two_stage.TwoStageModel, "from_refs",
                        classmethod(lambda cls, *a, **k: loaded.append(k.get("dtype")) or real(*a, **k)))
    for precision in ("fp32", "bf16"):
        reference = text(real(*dirs, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[precision])),
                         max_new_tokens=8)
        assert cli("--max-new-tokens", "8", "--precision", precision) == reference + "\n"
    assert loaded == [torch.float32, torch.bfloat16]
