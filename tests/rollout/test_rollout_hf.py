import pytest
import torch

from spo_ray.rollout.base import Engine, SamplingConfig
from spo_ray.data.chat import format_prompt
from spo_ray.rollout.hf import HFEngine


def _sampling(**kw):
    base = dict(num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=7)
    return SamplingConfig(**{**base, **kw})


def test_generates_k_samples_per_prompt_with_token_counts(tiny_policy):
    engine = HFEngine(tiny_policy)
    assert isinstance(engine, Engine)
    out = engine.generate(["Describe the sea.", "Hi"], _sampling())
    assert len(out) == 2
    for rollout in out:
        assert len(rollout.responses) == len(rollout.num_tokens) == len(rollout.truncated) == 3
        assert all(1 <= n <= 12 for n in rollout.num_tokens)
        # a response that stopped before the cap ended at EOS, one at the cap is marked truncated
        assert all(t == (n == 12 and t) for n, t in zip(rollout.num_tokens, rollout.truncated))


def test_same_seed_same_samples_other_seed_differs(tiny_policy):
    engine = HFEngine(tiny_policy)
    a = engine.generate(["Describe the sea."], _sampling(seed=1))[0].responses
    b = engine.generate(["Describe the sea."], _sampling(seed=1))[0].responses
    c = engine.generate(["Describe the sea."], _sampling(seed=2))[0].responses
    assert a == b and a != c


def test_greedy_answers_are_identical_across_samples(tiny_policy):
    out = HFEngine(tiny_policy).generate(["Hi"], _sampling(temperature=0.0, num_samples=2))[0]
    assert out.responses[0] == out.responses[1]


def test_chat_template_is_applied(tiny_policy):
    engine = HFEngine(tiny_policy)
    text = format_prompt(engine.tokenizer, "Hi")
    assert text.startswith("<|user|>\nHi") and text.endswith("<|assistant|>\n")


def test_load_weights_swaps_the_policy(tiny_policy, tmp_path):
    from spo_ray.modeling import load_policy, load_tokenizer, save_policy

    model = load_policy(tiny_policy)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    other = save_policy(model, load_tokenizer(tiny_policy), tmp_path / "other")
    engine = HFEngine(tiny_policy)
    greedy = _sampling(temperature=0.0, num_samples=1, max_new_tokens=16)
    before = engine.generate(["Describe the sea."], greedy)[0].responses
    engine.load_weights(str(other))
    assert engine.path == str(other)
    assert engine.generate(["Describe the sea."], greedy)[0].responses != before


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        _sampling(top_p=0)
    with pytest.raises(ValueError, match="num_samples"):
        _sampling(num_samples=0)
