import pytest
import torch

from spo_ray.judge import Judge, build_judge, scores_from_logits
from spo_ray.judge.rules import KeywordJudge, LengthJudge


def test_scores_are_pairrm_aggregate():
    m = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, -1.0], [3.0, 1.0, 0.0]])
    # s_i = (1/3) Σ_j (M[i,j] − M[j,i]):  s_0 = (0 + (2−0) + (1−3))/3 = 0
    # s_1 = ((0−2) + 0 + (−1−1))/3 = −4/3,  s_2 = ((3−1) + (1+1) + 0)/3 = 4/3
    assert torch.allclose(scores_from_logits(m), torch.tensor([0.0, -4 / 3, 4 / 3]))


def test_keyword_judge_logits_by_hand():
    judge = KeywordJudge("e", temperature=0.5)
    assert isinstance(judge, Judge)
    m = judge.pairwise_logits("p", ["ee", "ab", "e_"])  # shares 1, 0, 0.5
    expected = torch.tensor([[0, 2, 1], [-2, 0, -1], [-1, 1, 0]], dtype=torch.float32)
    assert torch.allclose(m, expected)
    assert torch.allclose(m, -m.T)
    assert judge.pairwise_logits("p", ["", "e"])[0, 1] == -2


def test_length_judge_and_batching():
    judge = LengthJudge()
    out = judge.batch_pairwise_logits(["a", "b"], [["x", "xyz"], ["", "", "ab"]])
    assert out[0].tolist() == [[0, -2], [2, 0]]
    assert out[1].shape == (3, 3) and out[1][2, 0] == 2


def test_bad_keyword_judge_config():
    with pytest.raises(ValueError, match="target"):
        KeywordJudge("", 1.0)
    with pytest.raises(ValueError, match="temperature"):
        KeywordJudge("e", 0)


def test_build_judge_from_config():
    from tests.conftest import compose

    _, cfg = compose(["experiment=tiny"])
    judge = build_judge(cfg.judge)
    assert isinstance(judge, KeywordJudge) and judge.target == cfg.judge.keyword.target
