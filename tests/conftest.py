import pytest
import torch


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
