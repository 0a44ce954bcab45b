"""Tests for spo_ray.sppo against values derived by hand.

Constants used below (ln = natural log, σ(x) = 1/(1 + e^−x)):
    ln 2 = 0.6931471805599453      ln 4 = 1.3862943611198906
    ln 6 = 1.791759469228055       ln 12 = 2.4849066497880004
    ln(3/4) = −0.2876820724517809
    σ(1) = 0.7310585786300049      σ(−1) = 1 − σ(1) = 0.2689414213699951
    σ(2) = 0.8807970779778823      σ(−2) = 0.11920292202211755
    −ln σ(1) = ln(1 + e^−1) = 0.3132616875182228
    −ln σ(−1) = 1 + ln(1 + e^−1) = 1.3132616875182228
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from spo_ray import sppo
from spo_ray.sppo import (
    LOSS_TYPES,
    PairChoice,
    indexed_logps,
    preference_loss,
    select_pair,
    sequence_logps,
    win_probabilities,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


# ---------------------------------------------------------------------------
# sequence_logps
# ---------------------------------------------------------------------------


def test_sequence_logps_uniform_logits_give_log_one_over_v_per_scored_token() -> None:
    """V = 4 and all-zero logits: every token has log-prob ln(1/4) = −ln 4.

    Row 0: mask [0, 0, 1, 1, 0] → 2 scored tokens → −2 ln 4 = −2.772588722239781.
    Row 1: mask [0, 1, 1, 1, 1] → 4 scored tokens → −4 ln 4 = −5.545177444479562.
    Padding labels are −100 (HF's ignore index) and must not be indexed.
    """
    logits = torch.zeros(2, 5, 4)
    labels = torch.tensor([[3, 1, 2, 0, -100], [1, 2, 3, 0, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    out = sequence_logps(logits, labels, mask)
    assert out.shape == (2,)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-2.772588722239781, -5.545177444479562]))


def test_sequence_logps_hand_built_logits() -> None:
    """V = 3, logits chosen so that softmax gives simple fractions.

    Row 0 (prompt at t=0, response at t=1,2, padding at t=3):
        labels [2, 1, 2, −100], mask [0, 1, 1, 0]
        t=1 scored by logits[0] = [0, ln 2, ln 3] → [1, 2, 3]/6 → label 1: ln(2/6) = ln(1/3)
        t=2 scored by logits[1] = [0, 0, ln 2]    → [1, 1, 2]/4 → label 2: ln(2/4) = ln(1/2)
        logits[2], logits[3] are garbage and score nothing (t=3 is padding; t=4 does not exist).
        total = ln(1/3) + ln(1/2) = −ln 6 = −1.791759469228055
    Row 1 (mask 1 everywhere, but position 0 is never scored):
        labels [1, 0, 2, 2], mask [1, 1, 1, 1]
        t=1 scored by logits[0] = [ln 3, ln 2, 0] → [3, 2, 1]/6 → label 0: ln(1/2)
        t=2 scored by logits[1] = [0, 0, 0]       → uniform      → label 2: ln(1/3)
        t=3 scored by logits[2] = [1, 1, 1 + ln 2] → [e, e, 2e]/4e → label 2: ln(1/2)
        total = ln(1/2) + ln(1/3) + ln(1/2) = −ln 12 = −2.4849066497880004
    """
    logits = torch.tensor(
        [
            [[0.0, LN2, LN3], [0.0, 0.0, LN2], [100.0, -100.0, 7.0], [-50.0, 3.0, 9.0]],
            [[LN3, LN2, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0 + LN2], [42.0, -42.0, 0.0]],
        ]
    )
    labels = torch.tensor([[2, 1, 2, -100], [1, 0, 2, 2]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    out = sequence_logps(logits, labels, mask)
    torch.testing.assert_close(out, torch.tensor([-1.791759469228055, -2.4849066497880004]))


def test_indexed_logps_two_sequences_reading_one_row_by_hand() -> None:
    """V = 2, one row of logits read by two scored sequences (a shared prompt's layout).

    logits[0] = [0, ln 3]  → softmax [1/4, 3/4]
    logits[1] = [ln 2, 0]  → softmax [2/3, 1/3]
    logits[2] = [0, 0]     → softmax [1/2, 1/2]
    Sequence 0 (row 0): positions [0, 1], targets [1, 0], mask [1, 1]:
        ln(3/4) + ln(2/3) = ln(1/2) = −0.6931471805599453
    Sequence 1 (row 0): positions [0, 2], targets [0, 1], mask [1, 0] — position 0 again
        (both responses' first token), the masked entry never counts: ln(1/4) = −1.3862943611198906
    """
    logits = torch.tensor([[[0.0, LN3], [LN2, 0.0], [0.0, 0.0]]])
    out = indexed_logps(
        logits,
        rows=torch.tensor([0, 0]),
        sources=torch.tensor([[0, 1], [0, 2]]),
        targets=torch.tensor([[1, 0], [0, 1]]),
        mask=torch.tensor([[1, 1], [1, 0]]),
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-0.6931471805599453, -1.3862943611198906]))


def test_indexed_logps_equals_sequence_logps_on_consecutive_tokens() -> None:
    """Sources t − 1 and targets labels_t: the same sums as `sequence_logps`."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    labels = torch.randint(0, 5, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    sources = torch.arange(5).expand(2, 5)
    out = indexed_logps(logits, torch.tensor([0, 1]), sources, labels[:, 1:], mask[:, 1:])
    torch.testing.assert_close(out, sequence_logps(logits, labels, mask))
    with pytest.raises(ValueError, match="sources, targets, mask"):
        indexed_logps(logits, torch.tensor([0]), sources[:1], labels[:1, 1:], mask)


def test_sequence_logps_scores_token_t_with_logits_t_minus_1() -> None:
    """V = 2, one scored token at t = 2 with label 1.

    logits[1] = [0, ln 3] → p(1) = 3/4 (the right, shifted answer: ln(3/4) = −0.28768...).
    logits[2] = [ln 3, 0] → p(1) = 1/4 (what an unshifted implementation would use).
    """
    logits = torch.tensor([[[5.0, -5.0], [0.0, LN3], [LN3, 0.0]]])
    labels = torch.tensor([[0, 0, 1]])
    mask = torch.tensor([[0, 0, 1]])
    out = sequence_logps(logits, labels, mask)
    torch.testing.assert_close(out, torch.tensor([-0.2876820724517809]))


def test_sequence_logps_ignores_prompt_and_padding_logits() -> None:
    """Only logits at positions t − 1 with mask_t = 1 matter: perturbing the others changes
    nothing. Uniform V = 4 with mask [0, 0, 1, 1, 0, 0]: −2 ln 4 = −2.772588722239781,
    whatever the prompt (positions 0, 1 → scoring t=1) and padding (positions 3..5) hold."""
    logits = torch.zeros(1, 6, 4)
    logits[0, 0] = torch.tensor([9.0, -3.0, 2.0, 0.5])  # scores t=1: prompt
    logits[0, 3] = torch.tensor([-7.0, 8.0, 1.0, 4.0])  # scores t=4: padding
    logits[0, 4] = torch.tensor([float("-inf"), 0.0, 0.0, 0.0])  # scores t=5: padding
    logits[0, 5] = torch.tensor([3.0, 3.0, -1.0, 0.0])  # last position: never used
    labels = torch.tensor([[1, 2, 3, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 0, 0]])
    out = sequence_logps(logits, labels, mask)
    torch.testing.assert_close(out, torch.tensor([-2.772588722239781]))


def test_sequence_logps_all_masked_is_zero() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.zeros(2, 3, dtype=torch.long)
    torch.testing.assert_close(sequence_logps(logits, labels, mask), torch.zeros(2))


def test_sequence_logps_bf16_is_computed_in_float32() -> None:
    """bf16 logits [0, 2] (both exact in bf16), label 1 at 128 scored positions:
    log p(1) = 2 − ln(1 + e²) = −ln(1 + e^−2) = −0.1269280110429725 per token,
    total = −16.246785413500493. A bf16 sum would be off by ~0.06 (bf16 spacing at 16
    is 0.125), so a 1e-4 tolerance only passes a float32 computation.
    """
    logits = torch.tensor([0.0, 2.0], dtype=torch.bfloat16).expand(1, 129, 2).contiguous()
    labels = torch.ones(1, 129, dtype=torch.long)
    mask = torch.ones(1, 129, dtype=torch.long)
    out = sequence_logps(logits, labels, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([-16.246785413500493]), atol=1e-4, rtol=0)


def test_sequence_logps_gradient_is_onehot_minus_softmax_on_scored_positions() -> None:
    """d log softmax(z)[y] / dz = onehot(y) − softmax(z). With uniform V = 4 logits that is
    onehot − 1/4 at the scoring positions (t − 1 for mask_t = 1) and 0 elsewhere."""
    logits = torch.zeros(1, 4, 4, requires_grad=True)
    labels = torch.tensor([[0, 3, 1, 2]])
    mask = torch.tensor([[0, 0, 1, 1]])  # scored: t=2 (by logits[1]), t=3 (by logits[2])
    sequence_logps(logits, labels, mask).sum().backward()
    expected = torch.zeros(1, 4, 4)
    expected[0, 1] = torch.tensor([-0.25, 0.75, -0.25, -0.25])  # label 1
    expected[0, 2] = torch.tensor([-0.25, -0.25, 0.75, -0.25])  # label 2
    torch.testing.assert_close(logits.grad, expected)


def test_sequence_logps_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 3).long(), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 3).long(), torch.ones(2, 4))


# ---------------------------------------------------------------------------
# win_probabilities
# ---------------------------------------------------------------------------


def test_win_probabilities_values() -> None:
    """s = [0, ln 3]: σ(−ln 3) = 1/(1 + 3) = 1/4, σ(ln 3) = 3/4, σ(0) = 1/2."""
    p = win_probabilities(torch.tensor([0.0, LN3]))
    torch.testing.assert_close(p, torch.tensor([[0.5, 0.25], [0.75, 0.5]]))


def test_win_probabilities_batched() -> None:
    """Two prompts of K = 3: s = [1, 0, 0] and s = [0, 0, 2]."""
    s1, sm1 = 0.7310585786300049, 0.2689414213699951
    s2, sm2 = 0.8807970779778823, 0.11920292202211755
    p = win_probabilities(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64))
    expected = torch.tensor(
        [
            [[0.5, s1, s1], [sm1, 0.5, 0.5], [sm1, 0.5, 0.5]],
            [[0.5, 0.5, sm2], [0.5, 0.5, sm2], [s2, s2, 0.5]],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(p, expected)


def test_win_probabilities_symmetry_and_diagonal() -> None:
    scores = torch.randn(3, 2, 5, dtype=torch.float64)
    p = win_probabilities(scores)
    assert p.shape == (3, 2, 5, 5)
    torch.testing.assert_close(p + p.transpose(-1, -2), torch.ones_like(p))
    diagonal = torch.diagonal(p, dim1=-2, dim2=-1)
    torch.testing.assert_close(diagonal, torch.full((3, 2, 5), 0.5, dtype=torch.float64))


def test_win_probabilities_integer_scores_become_float() -> None:
    p = win_probabilities(torch.tensor([0, 0]))
    assert p.is_floating_point()
    torch.testing.assert_close(p, torch.full((2, 2), 0.5))


# ---------------------------------------------------------------------------
# select_pair
# ---------------------------------------------------------------------------


def test_select_pair_hand_computed() -> None:
    """s = [1, 0, 0]:
        P = [[½, σ(1), σ(1)], [σ(−1), ½, ½], [σ(−1), ½, ½]]
        p̂_0 = (½ + 2·0.7310585786300049)/3 = 1.9621171572600098/3 = 0.6540390524200033
        p̂_1 = p̂_2 = (0.2689414213699951 + 1)/3 = 0.4229804737899984
        (check: Σ p̂ = 1.5 = K/2)
    chosen = 0, rejected = 1 (first of the tied minima), P[0, 1] = σ(1).
    """
    choice = select_pair([1.0, 0.0, 0.0])
    assert choice is not None
    assert (choice.chosen, choice.rejected) == (0, 1)
    assert choice.chosen_probs == pytest.approx(0.7310585786300049, abs=1e-12)
    assert choice.chosen_probs_win == pytest.approx(0.6540390524200033, abs=1e-12)
    assert choice.chosen_probs_lose == pytest.approx(0.4229804737899984, abs=1e-12)
    assert choice.win_rates == pytest.approx(
        [0.6540390524200033, 0.4229804737899984, 0.4229804737899984], abs=1e-12
    )
    assert sum(choice.win_rates) == pytest.approx(1.5, abs=1e-12)


def test_select_pair_two_responses() -> None:
    """s = [0, ln 3]: P = [[½, ¼], [¾, ½]], p̂ = [(½ + ¼)/2, (¾ + ½)/2] = [0.375, 0.625].
    chosen = 1, rejected = 0, P[1, 0] = 0.75."""
    choice = select_pair(torch.tensor([0.0, LN3]))
    assert choice is not None
    assert (choice.chosen, choice.rejected) == (1, 0)
    assert choice.chosen_probs == pytest.approx(0.75, abs=1e-7)
    assert choice.chosen_probs_win == pytest.approx(0.625, abs=1e-7)
    assert choice.chosen_probs_lose == pytest.approx(0.375, abs=1e-7)


def test_select_pair_tied_maximum_takes_first_index() -> None:
    """s = [2, 2, 0]:
        p̂_0 = p̂_1 = (½ + ½ + σ(2))/3 = 1.8807970779778823/3 = 0.6269323593259607
        p̂_2 = (2σ(−2) + ½)/3 = 0.7384058440442351/3 = 0.24613528134807838
    chosen = 0 (first of the tied maxima), rejected = 2, P[0, 2] = σ(2)."""
    choice = select_pair([2.0, 2.0, 0.0])
    assert choice is not None
    assert (choice.chosen, choice.rejected) == (0, 2)
    assert choice.chosen_probs == pytest.approx(0.8807970779778823, abs=1e-12)
    assert choice.chosen_probs_win == pytest.approx(0.6269323593259607, abs=1e-12)
    assert choice.chosen_probs_lose == pytest.approx(0.24613528134807838, abs=1e-12)


@pytest.mark.parametrize("scores", [[3.0, 3.0, 3.0], [0.0, 0.0], [-1.5] * 5])
def test_select_pair_all_equal_returns_none(scores: list[float]) -> None:
    assert select_pair(scores) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_select_pair_rejects_non_finite_scores(bad: float) -> None:
    with pytest.raises(ValueError, match=rf"scores\[1\] = {bad}"):
        select_pair([0.5, bad, 0.0])


def test_select_pair_rejects_nan_in_tensor() -> None:
    with pytest.raises(ValueError, match="nan"):
        select_pair(torch.tensor([0.0, 1.0, float("nan")]))


@pytest.mark.parametrize("scores", [[1.0], []])
def test_select_pair_rejects_fewer_than_two(scores: list[float]) -> None:
    with pytest.raises(ValueError, match="K >= 2"):
        select_pair(scores)


def test_select_pair_rejects_2d_scores() -> None:
    with pytest.raises(ValueError, match="1-D"):
        select_pair(torch.zeros(2, 3))


def test_pair_choice_is_frozen() -> None:
    choice = select_pair([1.0, 0.0])
    assert isinstance(choice, PairChoice)
    with pytest.raises(dataclasses.FrozenInstanceError):
        choice.chosen = 1  # type: ignore[misc]
    hash(choice)  # hashable despite the list field


# ---------------------------------------------------------------------------
# preference_loss
# ---------------------------------------------------------------------------


def _logps(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    """Tensors for a batch; policy log-probs require grad."""
    pc = torch.tensor(policy_chosen, requires_grad=True)
    pr = torch.tensor(policy_rejected, requires_grad=True)
    return pc, pr, torch.tensor(ref_chosen), torch.tensor(ref_rejected)


def test_loss_types_registry() -> None:
    assert isinstance(LOSS_TYPES, tuple)
    assert set(LOSS_TYPES) == {"sppo", "sppo_hard", "dpo", "ipo"}


def test_sppo_loss_hand_computed() -> None:
    """β = 0.5 → η = 2.
    Example 0: a = −3 − (−4) = 1, b = −5 − (−4) = −1, p̂_w = 0.75, p̂_l = 0.25:
        a − η(p̂_w − ½) = 1 − 0.5 = 0.5,  b − η(p̂_l − ½) = −1 + 0.5 = −0.5
        L = ½(0.25 + 0.25) = 0.25;  dL/d policy_chosen = 0.5, dL/d policy_rejected = −0.5
    Example 1: a = 0, b = 0, p̂_w = 0.9, p̂_l = 0.2:
        0 − 2·0.4 = −0.8,  0 − 2·(−0.3) = 0.6
        L = ½(0.64 + 0.36) = 0.5;  gradients −0.8 and 0.6
    """
    pc, pr, rc, rr = _logps([-3.0, -10.0], [-5.0, -12.0], [-4.0, -10.0], [-4.0, -12.0])
    loss = preference_loss(
        pc, pr, rc, rr,
        loss_type="sppo", beta=0.5,
        chosen_probs_win=torch.tensor([0.75, 0.9]),
        chosen_probs_lose=torch.tensor([0.25, 0.2]),
    )
    assert loss.shape == (2,)  # per example, not reduced
    torch.testing.assert_close(loss, torch.tensor([0.25, 0.5]))
    loss.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([0.5, -0.8]))
    torch.testing.assert_close(pr.grad, torch.tensor([-0.5, 0.6]))


def test_sppo_loss_paper_scale() -> None:
    """β = 0.001 (η = 1000, the paper's value), a = b = 0, p̂_w = 1, p̂_l = 0:
    L = ½(500² + 500²) = 250000 — the ~1e5 starting losses DESIGN §1 warns about.
    Win rates given as plain floats."""
    zeros = torch.zeros(1)
    loss = preference_loss(
        zeros, zeros, zeros, zeros,
        loss_type="sppo", beta=0.001, chosen_probs_win=1.0, chosen_probs_lose=0.0,
    )
    torch.testing.assert_close(loss, torch.tensor([250000.0]))


def test_sppo_hard_loss_hand_computed() -> None:
    """β = 0.5 → η/2 = 1, L = (a − 1)² + (b + 1)²:
        a = 1, b = −1   → 0 + 0 = 0
        a = 0, b = 0    → 1 + 1 = 2
        a = 3, b = 0.5  → 4 + 2.25 = 6.25
    dL/d policy_chosen = 2(a − 1) = [0, −2, 4];  dL/d policy_rejected = 2(b + 1) = [0, 2, 3].
    """
    pc, pr, rc, rr = _logps([0.0, -2.0, 1.0], [-3.0, -2.0, -1.5], [-1.0, -2.0, -2.0], [-2.0] * 3)
    loss = preference_loss(pc, pr, rc, rr, loss_type="sppo_hard", beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([0.0, 2.0, 6.25]))
    loss.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([0.0, -2.0, 4.0]))
    torch.testing.assert_close(pr.grad, torch.tensor([0.0, 2.0, 3.0]))


def test_sppo_hard_is_twice_sppo_with_hard_win_rates() -> None:
    """Same inputs as above; sppo with p̂_w = 1, p̂_l = 0 is ½[(a − 1)² + (b + 1)²] =
    [0, 1, 3.125], exactly half of sppo_hard's [0, 2, 6.25]."""
    pc, pr, rc, rr = _logps([0.0, -2.0, 1.0], [-3.0, -2.0, -1.5], [-1.0, -2.0, -2.0], [-2.0] * 3)
    soft = preference_loss(
        pc, pr, rc, rr, loss_type="sppo", beta=0.5,
        chosen_probs_win=torch.ones(3), chosen_probs_lose=torch.zeros(3),
    )
    hard = preference_loss(pc, pr, rc, rr, loss_type="sppo_hard", beta=0.5)
    torch.testing.assert_close(soft, torch.tensor([0.0, 1.0, 3.125]))
    torch.testing.assert_close(hard, 2 * soft)


def test_dpo_loss_hand_computed() -> None:
    """β = 0.5, L = −ln σ(β(a − b)):
        a − b = 2  → −ln σ(1)  = 0.3132616875182228
        a − b = 0  → −ln σ(0)  = ln 2 = 0.6931471805599453
        a − b = −2 → −ln σ(−1) = 1.3132616875182228
    dL/d policy_chosen = −β σ(−β(a − b)) = [−0.5σ(−1), −0.25, −0.5σ(1)]
                       = [−0.13447071068499755, −0.25, −0.36552928931500245]
    dL/d policy_rejected is the negative of that.
    """
    pc, pr, rc, rr = _logps([-1.0, -2.0, -3.0], [-3.0, -2.0, -1.0], [-2.0] * 3, [-2.0] * 3)
    loss = preference_loss(pc, pr, rc, rr, loss_type="dpo", beta=0.5)
    torch.testing.assert_close(
        loss, torch.tensor([0.3132616875182228, 0.6931471805599453, 1.3132616875182228])
    )
    loss.sum().backward()
    expected = torch.tensor([-0.13447071068499755, -0.25, -0.36552928931500245])
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)


def test_dpo_loss_is_stable_for_large_margins() -> None:
    """β = 1, a − b = ±1000: −ln σ(1000) = ln(1 + e^−1000) ≈ 0 and
    −ln σ(−1000) = 1000 + ln(1 + e^−1000) ≈ 1000 (a naive log(sigmoid) gives inf)."""
    zeros = torch.zeros(2)
    loss = preference_loss(
        torch.tensor([1000.0, -1000.0]), zeros, zeros, zeros, loss_type="dpo", beta=1.0
    )
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.tensor([0.0, 1000.0]))


def test_ipo_loss_hand_computed() -> None:
    """β = 0.5 → 1/(2β) = 1, L = ((a − b) − 1)²:
        a − b = 2   → 1
        a − b = 0   → 1
        a − b = 2.5 → 2.25
    dL/d policy_chosen = 2((a − b) − 1) = [2, −2, 3]; dL/d policy_rejected = [−2, 2, −3].
    """
    pc, pr, rc, rr = _logps([0.0, -2.0, 1.0], [-3.0, -2.0, -1.5], [-1.0, -2.0, -2.0], [-2.0] * 3)
    loss = preference_loss(pc, pr, rc, rr, loss_type="ipo", beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([1.0, 1.0, 2.25]))
    loss.sum().backward()
    torch.testing.assert_close(pc.grad, torch.tensor([2.0, -2.0, 3.0]))
    torch.testing.assert_close(pr.grad, torch.tensor([-2.0, 2.0, -3.0]))


def test_ipo_loss_other_beta() -> None:
    """β = 0.1 → 1/(2β) = 5; a − b = 2 → (2 − 5)² = 9."""
    zeros = torch.zeros(1)
    loss = preference_loss(torch.tensor([2.0]), zeros, zeros, zeros, loss_type="ipo", beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([9.0]))


@pytest.mark.parametrize("loss_type", ["sppo", "sppo_hard", "dpo", "ipo"])
def test_gradients_reach_policy_logps_only(loss_type: str) -> None:
    pc = torch.tensor([-3.0, -4.0], requires_grad=True)
    pr = torch.tensor([-5.0, -4.5], requires_grad=True)
    rc = torch.tensor([-3.5, -4.0], requires_grad=True)
    rr = torch.tensor([-4.0, -5.0], requires_grad=True)
    win = torch.tensor([0.8, 0.6], requires_grad=True)
    lose = torch.tensor([0.3, 0.1], requires_grad=True)
    loss = preference_loss(
        pc, pr, rc, rr, loss_type=loss_type, beta=0.5,
        chosen_probs_win=win, chosen_probs_lose=lose,
    )
    loss.sum().backward()
    assert pc.grad is not None and torch.count_nonzero(pc.grad) > 0
    assert pr.grad is not None and torch.count_nonzero(pr.grad) > 0
    for frozen in (rc, rr, win, lose):
        assert frozen.grad is None


def test_bf16_logps_give_float32_loss() -> None:
    """a = 1, b = −1 in bf16 (exact), ipo with β = 0.5: ((1 + 1) − 1)² = 1, in float32."""
    zero = torch.zeros(1, dtype=torch.bfloat16)
    loss = preference_loss(
        torch.ones(1, dtype=torch.bfloat16), -torch.ones(1, dtype=torch.bfloat16), zero, zero,
        loss_type="ipo", beta=0.5,
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([1.0]))


def test_unknown_loss_type_lists_known_ones() -> None:
    zeros = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'") as excinfo:
        preference_loss(zeros, zeros, zeros, zeros, loss_type="kto", beta=0.1)
    for name in ("sppo", "sppo_hard", "dpo", "ipo"):
        assert name in str(excinfo.value)


def test_sppo_without_win_rates_raises() -> None:
    zeros = torch.zeros(1)
    with pytest.raises(ValueError, match="chosen_probs_win"):
        preference_loss(zeros, zeros, zeros, zeros, loss_type="sppo", beta=0.1)
    with pytest.raises(ValueError, match="chosen_probs_lose"):
        preference_loss(
            zeros, zeros, zeros, zeros, loss_type="sppo", beta=0.1, chosen_probs_win=zeros
        )


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf")])
def test_non_positive_beta_raises(beta: float) -> None:
    zeros = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        preference_loss(zeros, zeros, zeros, zeros, loss_type="dpo", beta=beta)


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(
            torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2),
            loss_type="dpo", beta=0.1,
        )


def test_registering_a_duplicate_loss_raises() -> None:
    before = dict(sppo._LOSSES)
    with pytest.raises(ValueError, match="already registered"):
        sppo._register_loss("dpo")(lambda a, b, beta, win, lose: a)
    assert sppo._LOSSES == before
