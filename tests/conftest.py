import json

import pytest
import torch

from overfill.data import in_validation


def tiny_hf_config(model_type: str = "llama", **overrides):
    """A tiny random config of a supported architecture (builds in milliseconds)."""
    from transformers import AutoConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def tiny_hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(model_type, **overrides), dtype=torch.float32)
    # Random init gives near-uniform logits; widen them so greedy choices are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_dir():
    from overfill.hub import resolve

    return resolve("smollm2-135m-instruct")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def ours(hf):
    """Our Transformer holding the weights of a transformers model."""
    from overfill.model import ModelArgs, from_state_dict

    return from_state_dict(ModelArgs.from_hf(hf.config), hf.state_dict())


def save_hf_dir(hf, tokenizer, out):
    """A transformers model saved as a model directory with a tokenizer: a tokenizer object (saved with
    save_pretrained) or a model directory (its tokenizer files copied as they are). Returns `out`."""
    import shutil
    from pathlib import Path

    out = Path(out)
    hf.save_pretrained(out)
    if isinstance(tokenizer, (str, Path)):
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copy(Path(tokenizer) / name, out / name)
    else:
        tokenizer.save_pretrained(out)
    return out


def save_tiny_dir(out, tokenizer, seed: int = 0, model_type: str = "llama", **overrides):
    """`tiny_hf_model(model_type, seed, **overrides)` saved as a model directory with `tokenizer` (see save_hf_dir)."""
    return save_hf_dir(tiny_hf_model(model_type, seed=seed, **overrides), tokenizer, out)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from overfill.hub import load_tokenizer

    return load_tokenizer(smollm2_dir)


# ---------------------------------------------------------------------------- a word-level world for pipeline tests

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} eos {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")
WORDS = ["pad", "bos", "eos", "system", "user", "assistant"] + [f"w{i}" for i in range(121)] + ["[UNK]"]


def word_tokenizer():
    """A 128-word tokenizer with a chat template: ids match the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="eos", pad_token="pad", bos_token="bos")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny(path, seed=0, **overrides):
    model = tiny_hf_model("llama", seed=seed, **overrides)
    model.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def chat(i, n_words=6):
    """A learnable chat: the answer repeats the question's words in reverse."""
    words = [f"w{(7 * i + 3 * j) % 100}" for j in range(n_words)]
    return {"id": f"chat{i}", "messages": [{"role": "user", "content": " ".join(words)},
                                           {"role": "assistant", "content": " ".join(reversed(words))}]}


def validation_ids(n):
    """Record ids that the data module's hash puts in the validation split."""
    return [i for i in range(10_000) if in_validation(f"chat{i}", 0.01)][:n]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path

