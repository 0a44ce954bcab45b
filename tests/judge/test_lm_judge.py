"""LMJudge: both-order averaging on a tiny random model; agreement of the real SmolLM2."""

from __future__ import annotations

import json
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from spo_ray.judge.base import Judge
from spo_ray.judge.lm_judge import LMJudge, answer_token_ids

CLEAR_CUT_PAIRS = json.loads((Path(__file__).parent / "clear_cut_pairs.json").read_text())
RESPONSES = ["Paris.", "It is Lyon, I think.", "", "The capital of France is Paris, on the Seine."]


def char_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}<assistant>"
    return fast


@pytest.fixture(scope="module")
def tiny_judge() -> LMJudge:
    tokenizer = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    # A short template keeps the character-level inputs short; the logic is the same.
    template = "Q: {prompt}\nA: {response_a}\nB: {response_b}\nBetter:"
    return LMJudge(LlamaForCausalLM(config), tokenizer, template=template, batch_size=5)


def test_matrix_is_antisymmetric_with_zero_diagonal(tiny_judge):
    assert isinstance(tiny_judge, Judge)
    M = tiny_judge.pairwise_logits("What is the capital of France?", RESPONSES)
    assert M.shape == (4, 4) and M.dtype == torch.float32
    torch.testing.assert_close(M, -M.T)
    assert torch.all(M.diagonal() == 0) and M.abs().sum() > 0


def test_both_orders_are_averaged(tiny_judge):
    prompt = "What is the capital of France?"
    M = tiny_judge.pairwise_logits(prompt, RESPONSES)
    for i in range(4):
        for j in range(4):
            if i != j:
                d_ij, d_ji = tiny_judge.answer_log_odds(
                    [tiny_judge.judge_text(prompt, RESPONSES[i], RESPONSES[j]),
                     tiny_judge.judge_text(prompt, RESPONSES[j], RESPONSES[i])]
                )
                assert M[i, j].item() == pytest.approx(((d_ij - d_ji) / 2).item(), abs=1e-5)


def test_padding_and_batching_do_not_change_the_answer(tiny_judge):
    prompts = ["What is the capital of France?", "Name a colour."]
    responses = [RESPONSES, ["Blue.", "A colour is a colour is a colour."]]
    batched = tiny_judge.batch_pairwise_logits(prompts, responses)
    one_by_one = LMJudge(tiny_judge.model, tiny_judge.tokenizer, template=tiny_judge.template, batch_size=1)
    for prompt, rs, m in zip(prompts, responses, batched):
        torch.testing.assert_close(one_by_one.pairwise_logits(prompt, rs), m, atol=1e-5, rtol=1e-4)


class PositionBiased(torch.nn.Module):
    """Always says "A" with log-odds 3, whatever it reads: pure position bias."""

    def __init__(self, vocab_size: int, a_id: int, b_id: int) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.a_id, self.b_id = vocab_size, a_id, b_id

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[..., self.a_id] = 3.0
        return SimpleNamespace(logits=logits)


def test_order_averaging_cancels_a_constant_position_bias():
    tokenizer = char_tokenizer()
    (a_id,), (b_id,) = answer_token_ids(tokenizer, "A"), answer_token_ids(tokenizer, "B")
    judge = LMJudge(PositionBiased(len(tokenizer), a_id, b_id), tokenizer)
    assert judge.answer_log_odds(["anything"]).item() == pytest.approx(3.0)
    torch.testing.assert_close(judge.pairwise_logits("q", RESPONSES), torch.zeros(4, 4))


def test_template_must_name_its_fields():
    with pytest.raises(ValueError, match="response_b"):
        LMJudge(PositionBiased(10, 0, 1), char_tokenizer(), template="{prompt} {response_a}")


@pytest.mark.slow
def test_smollm2_as_judge_is_measured_on_clear_cut_pairs(smollm2_dir, record_property):
    """SmolLM2-135M-Instruct is a weak judge; this records how weak (see docs/judges.md)."""
    judge = LMJudge.from_pretrained(smollm2_dir, batch_size=8)
    prompts = [item["prompt"] for item in CLEAR_CUT_PAIRS]
    pairs = [[item["good"], item["bad"]] for item in CLEAR_CUT_PAIRS]
    texts = [judge.judge_text(p, g, b) for p, (g, b) in zip(prompts, pairs)]
    texts += [judge.judge_text(p, b, g) for p, (g, b) in zip(prompts, pairs)]
    log_odds = judge.answer_log_odds(texts)  # good as A, then good as B
    n = len(prompts)
    says_a = (log_odds > 0).float().mean().item()
    single_order = ((log_odds[:n] > 0).float().sum() + (log_odds[n:] < 0).float().sum()).item() / (2 * n)
    margins = (log_odds[:n] - log_odds[n:]) / 2  # M[good, bad], both orders averaged
    agreement = (margins > 0).float().mean().item()
    p_good = torch.sigmoid(margins).mean().item()
    for name, value in [("lm_judge_agreement", agreement), ("lm_judge_single_order_agreement", single_order),
                        ("lm_judge_says_a", says_a), ("lm_judge_mean_p_good", p_good)]:
        record_property(name, value)
    print(f"SmolLM2 judge on {n} clear-cut pairs: agreement {agreement:.3f} (both orders), "
          f"{single_order:.3f} (single order), answers 'A' {says_a:.3f}, mean σ(M[good,bad]) {p_good:.3f}")
    torch.testing.assert_close(judge.pairwise_logits(prompts[0], pairs[0])[0, 1], margins[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(log_odds).all()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> str:
    from spo_ray.gguf import convert_gguf_to_hf, shipped_model_path

    # Same folder as tests/test_gguf.py: converted once per session, whichever runs first.
    return convert_gguf_to_hf(shipped_model_path(), tmp_path_factory.getbasetemp() / "smollm2-135m-instruct")
