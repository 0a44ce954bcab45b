"""The tabular cyclic game of benchmarks/nash_tabular.py, against hand computations."""

import math

import pytest
import torch

from benchmarks.nash_tabular import (
    ClassPair,
    SampledSettings,
    exploitability_curves,
    mw_update,
    play_mw,
    sample_pairs,
    train_on_pairs,
)
from spo_ray.judge.cyclic import CyclicGame, CyclicJudge

WIN_PROBS = (0.6, 0.9, 0.7)


def test_mw_update_by_hand():
    """From uniform, η = 1: P(y ≻ π_0) = (1.4/3, 1.8/3, 1.3/3), so
    π_1 ∝ (1, e^{0.4/3}, e^{−0.1/3}) = (1, 1.142631, 0.967216) / 3.109847."""
    pi1 = mw_update(CyclicGame(WIN_PROBS), [1 / 3] * 3, eta=1.0)
    assert pi1 == pytest.approx([0.321559, 0.367423, 0.311018], abs=1e-6)
    assert mw_update(CyclicGame(WIN_PROBS), [4 / 7, 2 / 7, 1 / 7], eta=5.0) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_exploitability_curves_by_hand():
    game = CyclicGame(WIN_PROBS)
    dists = [[1 / 3] * 3, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    last, avg = exploitability_curves(game, dists)
    assert last == pytest.approx([0.1, 0.2, 0.1])
    # avg[2] is the mixture (½, ½, 0): lower 0.55, upper 0.45, other (0.7 + 0.1)/2 = 0.4
    assert avg == pytest.approx([0.1, 0.2, 0.05])


def test_average_mw_iterate_approaches_nash():
    game = CyclicGame(WIN_PROBS)
    last, avg = exploitability_curves(game, play_mw(game, [0.29, 0.27, 0.44], 40, eta=3.0))
    assert avg[0] > 0.14 and avg[-1] < 0.02


def test_sampled_pairs_by_hand():
    """Half lowercase, half uppercase, K = 2: every pair that is not a tie is (lower, upper),
    p̂_w = (½ + 9/13)/2 and p̂_l = (½ + 4/13)/2 (see tests/judge/test_cyclic_judge.py)."""
    settings = SampledSettings(prompts=200, num_samples=2)
    pairs = sample_pairs(CyclicJudge(WIN_PROBS), [0.5, 0.5, 0.0], settings, torch.Generator().manual_seed(0))
    assert 70 < len(pairs) < 130  # P(no tie) = ½
    assert {(p.chosen, p.rejected) for p in pairs} == {(0, 1)}
    assert pairs[0].win == pytest.approx((0.5 + 9 / 13) / 2, abs=1e-6)
    assert pairs[0].lose == pytest.approx((0.5 + 4 / 13) / 2, abs=1e-6)


def test_sppo_loss_trains_log_ratios_to_their_targets():
    """One pair, β = 1 (η = 1), p̂_w = 0.8, p̂_l = 0.2: the sppo loss is 0 at log-ratios
    +0.3 / −0.3, which a softmax over 3 classes from uniform can reach (the third class
    takes log(3 − e^{0.3} − e^{−0.3}) = −0.0951)."""
    ref = torch.zeros(3)
    pair = ClassPair(chosen=0, rejected=1, win=0.8, lose=0.2)
    settings = SampledSettings(loss="sppo", beta=1.0, lr=0.1, epochs=250, batch=1)
    theta = train_on_pairs(ref, [pair], settings, torch.Generator().manual_seed(0))
    ratios = torch.log_softmax(theta, -1) - torch.log_softmax(ref, -1)
    assert ratios.tolist() == pytest.approx([0.3, -0.3, math.log(3 - math.exp(0.3) - math.exp(-0.3))], abs=2e-3)


def test_ipo_trains_the_margin_to_one_over_two_beta():
    ref = torch.zeros(3)
    pair = ClassPair(chosen=2, rejected=0, win=0.8, lose=0.2)
    settings = SampledSettings(loss="ipo", beta=2.0, lr=0.1, epochs=250, batch=1)
    theta = train_on_pairs(ref, [pair], settings, torch.Generator().manual_seed(0))
    ratios = torch.log_softmax(theta, -1) - torch.log_softmax(ref, -1)
    assert (ratios[2] - ratios[0]).item() == pytest.approx(0.25, abs=2e-3)


def test_benchmark_writes_the_documented_json(tmp_path, monkeypatch):
    """`benchmarks/nash.py tabular --out` writes exactly {"nash", "methods": {sppo, dpo, ipo}}
    with T + 1 distributions and exploitabilities per method, and the plot beside it."""
    import json
    import sys

    from benchmarks import nash

    out = tmp_path / "nash.json"
    monkeypatch.setattr(sys, "argv", ["nash.py", "tabular", "--iterations", "3", "--out", str(out)])
    nash.main()
    result = json.loads(out.read_text())
    assert set(result) == {"nash", "methods"} and set(result["methods"]) == {"sppo", "dpo", "ipo"}
    assert result["nash"] == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    for record in result["methods"].values():
        assert set(record) == {"distribution", "exploitability_last", "exploitability_avg"}
        assert len(record["distribution"]) == len(record["exploitability_last"]) == len(record["exploitability_avg"]) == 4
        assert record["exploitability_avg"][0] == record["exploitability_last"][0] == pytest.approx(
            CyclicGame(WIN_PROBS).exploitability(nash.TINY_START)
        )
    sppo = result["methods"]["sppo"]["distribution"]
    assert sppo[1] == pytest.approx(mw_update(CyclicGame(WIN_PROBS), sppo[0], eta=3.0))
    assert (tmp_path / "nash.png").stat().st_size > 10_000
