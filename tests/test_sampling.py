import pytest
import torch

from overfill.engine.sampling import Sampler, SamplingParams, sample, uniform

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # [V]: distinct, well-separated probabilities
DRAWS = 20000


def frequencies(params: SamplingParams, logits=LOGITS, seed=11) -> torch.Tensor:
    """How often each token comes out over DRAWS counters (positions), for one row's settings."""
    sampler = Sampler([params] * DRAWS, [seed] * DRAWS, torch.device("cpu"))
    tokens = sample(logits.expand(DRAWS, -1), sampler, torch.arange(DRAWS))  # [DRAWS]
    return torch.bincount(tokens, minlength=len(logits)).float() / DRAWS


def reference(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a row should sample from, written out plainly."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep = order[:top_k] if top_k else order
    kept_probs = probs[keep] / probs[keep].sum()
    mass, nucleus = 0.0, []
    for token, p in zip(keep, kept_probs.tolist()):
        if mass >= top_p:
            break
        nucleus.append(token)
        mass += p
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus] / probs[nucleus].sum()
    return out


def assert_matches(freq: torch.Tensor, expected: torch.Tensor):
    sigma = (expected * (1 - expected) / DRAWS).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-9), (freq, expected)
    assert torch.all(freq[expected == 0] == 0)  # what top-k / top-p cut never comes out


def test_uniform_draws_are_in_the_open_unit_interval_and_uniform():
    u = uniform(torch.tensor([3, 3, 9]), torch.tensor([0, 1, 0]), 50000)  # [3, V]
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])  # the counter and the seed both matter


def test_greedy_is_the_argmax():
    logits = torch.randn(5, 100)
    sampler = Sampler([SamplingParams()] * 5, [0] * 5, torch.device("cpu"))
    assert torch.equal(sample(logits, sampler, torch.arange(5)), logits.argmax(-1))
    assert torch.equal(sample(logits, None, torch.arange(5)), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_temperature_sampling_follows_the_softmax(temperature):
    assert_matches(frequencies(SamplingParams(temperature=temperature)), reference(LOGITS, temperature))


@pytest.mark.parametrize("top_k", [2, 3, 5])
def test_mid_range_top_k_keeps_the_k_most_likely_in_proportion(top_k):
    expected = reference(LOGITS, 1.2, top_k=top_k)
    assert (expected > 0).sum() == top_k
    assert_matches(frequencies(SamplingParams(temperature=1.2, top_k=top_k)), expected)


@pytest.mark.parametrize("top_p", [0.5, 0.75, 0.9])
def test_mid_range_top_p_keeps_the_smallest_set_reaching_p(top_p):
    expected = reference(LOGITS, 1.0, top_p=top_p)
    assert 1 < (expected > 0).sum() < len(LOGITS)
    assert_matches(frequencies(SamplingParams(temperature=1.0, top_p=top_p)), expected)


def test_top_k_and_top_p_together_cut_by_both():
    expected = reference(LOGITS, 1.5, top_k=4, top_p=0.8)
    assert_matches(frequencies(SamplingParams(temperature=1.5, top_k=4, top_p=0.8)), expected)


def test_each_row_keeps_its_own_settings_and_its_tokens_do_not_depend_on_the_batch():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=5),
              SamplingParams(temperature=0.8, top_k=20, seed=6), SamplingParams(temperature=1.2, top_p=0.7, seed=7)]
    seeds = [0, 5, 6, 7]
    counter = torch.tensor([10, 11, 12, 13])
    together = sample(logits, Sampler(params, seeds, torch.device("cpu")), counter)
    alone = [sample(logits[b:b + 1], Sampler([params[b]], [seeds[b]], torch.device("cpu")), counter[b:b + 1]).item()
             for b in range(4)]
    assert together.tolist() == alone
    assert together[0] == logits[0].argmax()
    assert torch.topk(logits[2], 20).indices.tolist().count(together[2].item()) == 1


def test_padding_rows_of_a_sampler_are_greedy():
    sampler = Sampler([SamplingParams(temperature=1.0, seed=1)], [1], torch.device("cpu")).rows(4)
    assert sampler.greedy.tolist() == [False, True, True, True] and len(sampler.seed) == 4
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, sampler, torch.arange(4))[1:], logits[1:].argmax(-1))


def test_compiled_sampling_draws_the_same_tokens_as_eager():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(1)) * 2
    params = [SamplingParams(temperature=0.9, top_k=40, seed=1), SamplingParams(temperature=1.3, top_p=0.8, seed=2),
              SamplingParams()]
    sampler = Sampler(params, [1, 2, 3], torch.device("cpu"))
    counter = torch.tensor([7, 8, 9])
    compiled = torch.compile(sample, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(logits, sampler, counter), sample(logits, sampler, counter))


def test_seed_out_of_range_is_a_clear_error():
    from overfill.errors import OverfillError

    with pytest.raises(OverfillError, match="seed"):
        SamplingParams(seed=-1).validate()
