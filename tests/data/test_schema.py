import pyarrow as pa
import pytest
import torch

from spo_ray.data.schema import PAIR_COLUMNS, PAIR_SCHEMA, TokenStats, collate_pairs, collate_shared_pairs, pair_table
from spo_ray.modeling import build_char_tokenizer


def _row(prompt="Hi", chosen="abc", rejected="de", win=0.75, lose=0.25):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_probs_win": win, "chosen_probs_lose": lose}


def test_pair_schema_names_follow_design():
    assert PAIR_COLUMNS == (
        "prompt_id", "prompt", "responses", "scores", "win_rates", "chosen", "rejected",
        "chosen_probs", "chosen_probs_win", "chosen_probs_lose", "iteration",
    )
    assert PAIR_SCHEMA.field("responses").type == pa.list_(pa.string())


def test_collate_masks_prompt_and_padding_and_scores_response_with_eos():
    tok = build_char_tokenizer()
    batch = collate_pairs([_row()], tok, max_length=64, max_prompt_length=32)
    prompt_len = len(tok(tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    ids, mask, attn = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    assert ids.shape[0] == 2  # chosen row 0, rejected row 1
    # chosen: prompt, then "abc" + EOS; rejected: prompt, "de" + EOS, then one pad
    assert mask[0].tolist() == [0] * prompt_len + [1] * 4
    assert mask[1].tolist() == [0] * prompt_len + [1] * 3 + [0]
    assert attn[1].tolist() == [1] * (prompt_len + 3) + [0]
    assert ids[0, -1].item() == tok.eos_token_id and ids[1, -2].item() == tok.eos_token_id
    assert ids[1, -1].item() == tok.pad_token_id
    assert tok.decode(ids[0, prompt_len:prompt_len + 3]) == "abc"
    assert batch["chosen_probs_win"].tolist() == [0.75] and batch["chosen_probs_lose"].tolist() == [0.25]


def test_long_prompt_keeps_its_end_and_long_response_its_start_and_both_are_counted():
    tok = build_char_tokenizer()
    stats = TokenStats()
    batch = collate_pairs([_row(prompt="x" * 100 + "END", chosen="S" + "y" * 100)], tok, max_length=40, max_prompt_length=20, stats=stats)
    assert batch["input_ids"].shape[1] == 40
    prompt_part = tok.decode(batch["input_ids"][0, :20])
    assert "END" in prompt_part and batch["loss_mask"][0, :20].sum() == 0
    assert tok.decode(batch["input_ids"][0, 20:21]) == "S"
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 1


def test_a_row_that_fails_to_tokenize_becomes_a_counted_weight_0_stand_in():
    tok = build_char_tokenizer()
    stats = TokenStats()
    rows = [_row(), _row(chosen=None), {**_row(rejected=None), "skip_reason": "judge_nan"}, _row(prompt="y" * 100)]
    batch = collate_pairs(rows, tok, max_length=64, max_prompt_length=20, stats=stats)
    assert batch["valid"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert batch["input_ids"].shape[0] == 8 and batch["loss_mask"][1].sum() == 1  # a one-token stand-in
    # counted once, and only for a row that was a pair (the judge_nan row is already a counted skip)
    assert stats.reasons == {"tokenize_error": 1} and stats.prompts_truncated == 1


def test_shared_collate_packs_prompt_chosen_rejected_and_scores_the_same_tokens():
    """One sequence per pair: prompt (p tokens), "abc" + EOS at p..p+3, "de" + EOS at p+4..p+6.
    The rejected part restarts its positions at p, sees the prompt and itself but not the
    chosen part; its first token is scored by the prompt's last position, as in the
    two-sequence layout."""
    tok = build_char_tokenizer()
    row = _row()
    two = collate_pairs([row], tok, max_length=64, max_prompt_length=32)
    one = collate_shared_pairs([row], tok, max_length=64, max_prompt_length=32)
    p = int((two["loss_mask"][0] == 0).sum())
    ids = one["input_ids"][0]
    assert one["input_ids"].shape == (1, p + 4 + 3)
    assert tok.decode(ids[p:p + 3]) == "abc" and tok.decode(ids[p + 4:p + 6]) == "de"
    assert ids[:p + 4].tolist() == two["input_ids"][0].tolist()
    assert one["position_ids"][0].tolist() == list(range(p + 4)) + [p, p + 1, p + 2]
    mask = one["attention_mask"][0, 0]
    assert mask.shape == (p + 7, p + 7) and mask.dtype == torch.bool
    chosen, rejected = range(p, p + 4), range(p + 4, p + 7)
    for q in chosen:
        assert mask[q].tolist() == [k <= q for k in range(p + 7)]
    for q in rejected:
        assert mask[q].tolist() == [k < p or p + 4 <= k <= q for k in range(p + 7)]
    # Scored: (position whose logits score, token) for chosen then rejected, = the loss_mask tokens.
    sources, targets, keep = one["score_positions"], one["score_targets"], one["score_mask"]
    assert keep.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert sources[0].tolist() == [p - 1, p, p + 1, p + 2]
    assert sources[1, :3].tolist() == [p - 1, p + 4, p + 5]
    assert targets[0].tolist() == two["input_ids"][0, p:p + 4].tolist()
    assert targets[1, :3].tolist() == two["input_ids"][1, p:p + 3].tolist()
    for key in ("chosen_probs_win", "chosen_probs_lose", "valid"):
        assert torch.equal(one[key], two[key])


def test_shared_collate_pads_attend_only_to_themselves_and_stand_ins_score_nothing():
    tok = build_char_tokenizer()
    stats = TokenStats()
    rows = [_row(), _row(prompt="a longer prompt", chosen=None)]
    one = collate_shared_pairs(rows, tok, max_length=64, max_prompt_length=32, stats=stats)
    assert one["valid"].tolist() == [1.0, 0.0] and stats.reasons == {"tokenize_error": 1}
    length = int((one["input_ids"][0] != tok.pad_token_id).sum())
    mask = one["attention_mask"][0, 0]
    for q in range(length, mask.shape[0]):  # padding: itself only (no row without a key)
        assert mask[q].nonzero().flatten().tolist() == [q]
    assert not mask[:length, length:].any()  # nothing real attends to padding
    assert one["score_mask"][1].sum() == 0 and one["score_mask"][3].sum() == 0  # the stand-in's EOS at position 0


def test_pair_table_has_the_schema_and_drops_stream_columns():
    row = {c: None for c in PAIR_COLUMNS} | {"prompt_id": "p", "prompt": "q", "responses": ["a", "b"], "scores": [1.0, 0.0],
                                            "win_rates": [0.6, 0.4], "chosen": "a", "rejected": "b", "chosen_probs": 0.7,
                                            "chosen_probs_win": 0.6, "chosen_probs_lose": 0.4, "iteration": 1, "skip_reason": ""}
    table = pair_table([row])
    assert table.schema == PAIR_SCHEMA and table.num_rows == 1
    with pytest.raises(KeyError):
        pair_table([{"prompt_id": "p"}])
