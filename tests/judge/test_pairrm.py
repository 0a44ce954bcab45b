"""PairRMJudge: parity with llm-blender 0.0.2, both checkpoint layouts, batching, errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from spo_ray.judge.base import Judge
from spo_ray.judge.pairrm import PAIRRM_CANDIDATE_MAXLENGTH, PAIRRM_SOURCE_MAXLENGTH, PairRMJudge

ATOL = 1e-4  # parity with llm-blender (transformers 4.46.3 vs ours)
SAME = 1e-5  # the same model run in different batch shapes


@pytest.fixture(scope="module", params=["ranker", "hf"])
def judge(request: pytest.FixtureRequest, tiny_pairrm: dict) -> PairRMJudge:
    return PairRMJudge.from_pretrained(tiny_pairrm[request.param], device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ranker_judge(tiny_pairrm: dict) -> PairRMJudge:
    return PairRMJudge.from_pretrained(tiny_pairrm["ranker"], device="cpu", dtype="float32", token_budget=4096)


def _case(parity: dict, name: str) -> dict:
    return next(c for c in parity["rank_cases"] if c["name"] == name)


def test_rebuilt_checkpoint_is_the_one_the_fixture_was_made_with(tiny_pairrm: dict, pairrm_parity: dict) -> None:
    assert tiny_pairrm["digest"] == pairrm_parity["weights_digest"]
    assert (pairrm_parity["source_maxlength"], pairrm_parity["candidate_maxlength"]) == (
        PAIRRM_SOURCE_MAXLENGTH,
        PAIRRM_CANDIDATE_MAXLENGTH,
    )


def test_implements_the_judge_protocol(judge: PairRMJudge) -> None:
    assert isinstance(judge, Judge)


def test_tokens_match_llm_blender_collator(judge: PairRMJudge, pairrm_parity: dict) -> None:
    for case in pairrm_parity["rank_cases"]:
        encoded = judge._encode(case["prompt"], case["responses"])
        assert encoded.source == case["source_ids"], case["name"]
        assert encoded.candidates == case["candidate_ids"], case["name"]


def test_pairwise_logits_match_llm_blender(judge: PairRMJudge, pairrm_parity: dict) -> None:
    for case in pairrm_parity["rank_cases"]:
        got = judge.pairwise_logits(case["prompt"], case["responses"])
        torch.testing.assert_close(got, torch.tensor(case["logits"]), atol=ATOL, rtol=0, msg=case["name"])
        scores = judge.scores(case["prompt"], case["responses"])
        torch.testing.assert_close(scores, torch.tensor(case["scores"]), atol=ATOL, rtol=0, msg=case["name"])


def test_batched_logits_match_llm_blender_at_batch_size_one(ranker_judge: PairRMJudge, pairrm_parity: dict) -> None:
    cases = pairrm_parity["rank_cases"]
    got = ranker_judge.batch_pairwise_logits([c["prompt"] for c in cases], [c["responses"] for c in cases])
    for case, m in zip(cases, got):
        torch.testing.assert_close(m, torch.tensor(case["logits"]), atol=ATOL, rtol=0, msg=case["name"])


def test_compare_matches_llm_blender(judge: PairRMJudge, pairrm_parity: dict) -> None:
    c = pairrm_parity["compare"]
    got = judge.compare(c["prompts"], c["a"], c["b"])
    torch.testing.assert_close(got, torch.tensor(c["logits"]), atol=ATOL, rtol=0)


def test_ignores_llm_blenders_batch_dependence(ranker_judge: PairRMJudge, pairrm_parity: dict) -> None:
    """llm-blender cuts candidates by its batch's longest source; we keep each prompt's own."""
    effect = pairrm_parity["batch_effect"]
    cases = [_case(pairrm_parity, n) for n in effect["names"]]
    got = ranker_judge.batch_pairwise_logits([c["prompt"] for c in cases], [c["responses"] for c in cases])
    for case, m, batched in zip(cases, got, effect["logits"]):
        torch.testing.assert_close(m, torch.tensor(case["logits"]), atol=ATOL, rtol=0)
    # The long response shares llm-blender's batch with a 1224-token source: it was cut to 412 there.
    long_response = effect["names"].index("long_response")
    assert (got[long_response] - torch.tensor(effect["logits"][long_response])).abs().max() > 1e-2


def test_layouts_agree(tiny_pairrm: dict, pairrm_parity: dict) -> None:
    ranker = PairRMJudge.from_pretrained(tiny_pairrm["ranker"], device="cpu")
    hf = PairRMJudge.from_pretrained(tiny_pairrm["hf"], device="cpu")
    assert (ranker.source_maxlength, ranker.candidate_maxlength) == (hf.source_maxlength, hf.candidate_maxlength)
    cases = pairrm_parity["rank_cases"]
    prompts, responses = [c["prompt"] for c in cases], [c["responses"] for c in cases]
    for a, b in zip(ranker.batch_pairwise_logits(prompts, responses), hf.batch_pairwise_logits(prompts, responses)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_compatibility_forms_get_the_same_tokens_and_scores(ranker_judge: PairRMJudge) -> None:
    """The checkpoint's charsmap is NFKC: each pair below is one text to PairRM (and to llm-blender)."""
    pairs = [
        ("Wait\u2026 what?", "Wait... what?"),
        ("a\u00a0b", "a b"),
        ("\u00bd cup", "1\u20442 cup"),
        ("\ufb01ne \ufb02our", "fine flour"),
        ("\uff21\uff22\uff23\uff11\uff12\uff13", "ABC123"),
        ("\u3000spaced\u3000\u3000out\u00a0", "spaced out"),
    ]
    for a, b in pairs:
        encoded = ranker_judge._encode("q", [a, b])
        assert encoded.candidates[0] == encoded.candidates[1], (a, b)
    # Same tokens in both slots: M[0, 1] and M[1, 0] are one input, so the two score alike.
    m = ranker_judge.pairwise_logits("Is it\u2026 fine?", ["Wait\u2026 what?", "Wait... what?", "No."])
    assert m[0, 1] == m[1, 0]
    torch.testing.assert_close(m[0, 2], m[1, 2], atol=SAME, rtol=0)


def _resave_with_transformers(folder: Path) -> None:
    """What loading and saving the tokenizer with transformers 5 leaves: tokenizer.json with its NFC."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    assert "Precompiled" not in (folder / "tokenizer.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("charsmap_in", ["tokenizer.json", "spm.model"])
def test_hf_layout_takes_the_charsmap_from_either_file(
    tiny_pairrm: dict, pairrm_parity: dict, tmp_path: Path, charsmap_in: str
) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(tiny_pairrm["hf"], folder)
    if charsmap_in == "tokenizer.json":
        (folder / "spm.model").unlink()
    else:
        _resave_with_transformers(folder)
    judge = PairRMJudge.from_pretrained(folder, device="cpu")
    for name in ("nfkc_compat", "scripts_and_space"):
        case = _case(pairrm_parity, name)
        encoded = judge._encode(case["prompt"], case["responses"])
        assert (encoded.source, encoded.candidates) == (case["source_ids"], case["candidate_ids"]), name


def test_warns_when_the_checkpoint_has_no_charsmap(
    tiny_pairrm: dict, pairrm_parity: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "hf"
    shutil.copytree(tiny_pairrm["hf"], folder)
    (folder / "spm.model").unlink()
    _resave_with_transformers(folder)
    with caplog.at_level("WARNING", logger="spo_ray"):
        judge = PairRMJudge.from_pretrained(folder, device="cpu")
    assert "copy the checkpoint's spm.model" in caplog.text
    case = _case(pairrm_parity, "nfkc_compat")
    assert judge._encode(case["prompt"], case["responses"]).candidates != case["candidate_ids"]


def _workload(parity: dict) -> tuple[list[str], list[list[str]]]:
    short = [c for c in parity["rank_cases"] if not c["name"].startswith("long")]  # truncation: below
    prompts = [c["prompt"] for c in short]
    responses = [c["responses"] for c in short]
    rng = random.Random(0)
    words = "the a fox sea star blue answer step first second summary poem night sky child".split()
    for n in range(14):  # varied lengths and K, so that batches mix prompts
        k = rng.randint(2, 6)
        prompts.append(" ".join(rng.choices(words, k=rng.randint(3, 40))) + "?")
        responses.append([" ".join(rng.choices(words, k=rng.randint(0, 60))) for _ in range(k)])
    return prompts, responses


@pytest.mark.parametrize("token_budget", [256, 8192])
def test_batch_invariance(tiny_pairrm: dict, pairrm_parity: dict, token_budget: int) -> None:
    judge = PairRMJudge.from_pretrained(tiny_pairrm["ranker"], device="cpu", token_budget=token_budget)
    prompts, responses = _workload(pairrm_parity)
    reference = [judge.pairwise_logits(p, r) for p, r in zip(prompts, responses)]
    for size in (1, 3, 16):
        got = []
        for start in range(0, len(prompts), size):
            got += judge.batch_pairwise_logits(prompts[start : start + size], responses[start : start + size])
        for m, ref in zip(got, reference):
            torch.testing.assert_close(m, ref, atol=SAME, rtol=0)
    order = list(range(len(prompts)))
    random.Random(1).shuffle(order)
    shuffled = judge.batch_pairwise_logits([prompts[i] for i in order], [responses[i] for i in order])
    for m, i in zip(shuffled, order):
        torch.testing.assert_close(m, reference[i], atol=SAME, rtol=0)


@pytest.mark.parametrize("position_buckets", [16, 0])
def test_fast_attention_equals_transformers_forward(tmp_path: Path, position_buckets: int) -> None:
    """`PairRMModel._encode` (gathered bias + SDPA, last layer on 3 rows) vs DebertaV2Model."""
    from pairrm_checkpoints import build_random_pairrm

    ckpt = build_random_pairrm(tmp_path, seed=3, hidden=64, layers=3, heads=4, position_buckets=position_buckets)
    judge = PairRMJudge.from_pretrained(ckpt["hf"], device="cpu")
    assert judge.model.fast
    generator = torch.Generator().manual_seed(0)
    lengths = [300, 171, 40, 9]  # padded rows, and key distances beyond the log-bucket range
    ids = torch.randint(5, 120, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    positions = []
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = judge.pad_token_id
        positions.append(sorted(torch.randperm(n, generator=generator)[:3].tolist()))
    positions = torch.tensor(positions)
    with torch.inference_mode():
        fast = judge.model(ids, mask, positions)
        reference = judge.model(ids, mask, positions, reference=True)
        single = torch.cat([judge.model(ids[r : r + 1, :n], mask[r : r + 1, :n], positions[r : r + 1]) for r, n in enumerate(lengths)])
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast, single, atol=1e-5, rtol=0)


def test_truncation(ranker_judge: PairRMJudge, pairrm_parity: dict) -> None:
    sep = ranker_judge.tokenizer.sep_token_id
    long_source = _case(pairrm_parity, "long_source")
    e = ranker_judge._encode(long_source["prompt"], long_source["responses"])
    assert len(e.source) == PAIRRM_SOURCE_MAXLENGTH and e.source[-1] == sep
    assert max(len(c) for c in e.candidates) <= PAIRRM_CANDIDATE_MAXLENGTH

    long_response = _case(pairrm_parity, "long_response")
    e = ranker_judge._encode(long_response["prompt"], long_response["responses"])
    limit = PAIRRM_CANDIDATE_MAXLENGTH + (PAIRRM_SOURCE_MAXLENGTH - len(e.source)) // 2
    assert len(e.candidates[0]) == limit and e.candidates[0][-1] == sep
    assert all(c[-1] == sep for c in e.candidates)
    # Truncated text is scored on its kept prefix only: more text past the cut changes nothing.
    more = [long_response["responses"][0] + " and even more words", *long_response["responses"][1:]]
    torch.testing.assert_close(
        ranker_judge.pairwise_logits(long_response["prompt"], more),
        ranker_judge.pairwise_logits(long_response["prompt"], long_response["responses"]),
        atol=SAME,
        rtol=0,
    )


def test_scores_and_compare_formulas(ranker_judge: PairRMJudge) -> None:
    prompt, responses = "Which is best?", ["one", "two words", "three words here", "4"]
    m = ranker_judge.pairwise_logits(prompt, responses)
    assert m.shape == (4, 4) and m.dtype == torch.float32 and torch.all(m.diagonal() == 0)
    expected = torch.stack([sum(m[i, j] - m[j, i] for j in range(4)) / 4 for i in range(4)])
    torch.testing.assert_close(ranker_judge.scores(prompt, responses), expected, atol=1e-6, rtol=0)
    cmp = ranker_judge.compare([prompt, prompt], [responses[0], responses[2]], [responses[1], responses[3]])
    torch.testing.assert_close(cmp, torch.stack([m[0, 1] - m[1, 0], m[2, 3] - m[3, 2]]), atol=SAME, rtol=0)


def test_degenerate_inputs(ranker_judge: PairRMJudge) -> None:
    assert torch.equal(ranker_judge.pairwise_logits("p", ["only one"]), torch.zeros(1, 1))
    assert ranker_judge.pairwise_logits("p", []).shape == (0, 0)
    assert ranker_judge.batch_pairwise_logits([], []) == []
    assert ranker_judge.compare([], [], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        ranker_judge.batch_pairwise_logits(["a", "b"], [["x", "y"]])


def test_bin_weights_and_ranker_config_json(tiny_pairrm: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = tmp_path / "PairRM"
    folder.mkdir()
    config = json.loads((tiny_pairrm["ranker"] / "config.json").read_text())
    (folder / "ranker_config.json").write_text(json.dumps(config))
    torch.save(load_file(tiny_pairrm["ranker"] / "model.safetensors"), folder / "pytorch_model.bin")
    a = PairRMJudge.from_pretrained(folder, device="cpu").pairwise_logits("q", ["a", "b c"])
    b = PairRMJudge.from_pretrained(tiny_pairrm["ranker"], device="cpu").pairwise_logits("q", ["a", "b c"])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_backbone_override_and_dtype(tiny_pairrm: dict, tmp_path: Path) -> None:
    elsewhere = tmp_path / "deberta"
    shutil.copytree(tiny_pairrm["backbone"], elsewhere)
    judge = PairRMJudge.from_pretrained(tiny_pairrm["ranker"], backbone=elsewhere, device="cpu", dtype="bfloat16")
    assert next(judge.model.parameters()).dtype == torch.bfloat16
    assert judge.pairwise_logits("q", ["a", "b"]).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype='fp8'"):
        PairRMJudge.from_pretrained(tiny_pairrm["ranker"], device="cpu", dtype="fp8")


def test_error_for_a_folder_of_neither_layout(tmp_path: Path, tiny_pairrm: dict) -> None:
    with pytest.raises(ValueError, match="not a PairRM checkpoint"):
        PairRMJudge.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a PairRM checkpoint"):
        PairRMJudge.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="not a PairRM checkpoint"):  # a bare DeBERTa is not PairRM-hf
        PairRMJudge.from_pretrained(tiny_pairrm["backbone"], device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"ranker_type": "summareranker", "model_type": "roberta"}))
    with pytest.raises(ValueError, match="only llm-blender's DeBERTa pairranker"):
        PairRMJudge.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        PairRMJudge.from_pretrained(tmp_path / "missing", device="cpu")


def test_error_for_a_missing_tokenizer(tiny_pairrm: dict, tmp_path: Path) -> None:
    bare_backbone = tmp_path / "bare"
    bare_backbone.mkdir()
    shutil.copy(tiny_pairrm["backbone"] / "config.json", bare_backbone / "config.json")
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*bare"):
        PairRMJudge.from_pretrained(tiny_pairrm["ranker"], backbone=bare_backbone, device="cpu")

    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_pairrm["hf"] / name, hf / name)
    with pytest.raises(FileNotFoundError, match="backbone="):
        PairRMJudge.from_pretrained(hf, device="cpu")
    # The DeBERTa-v3 tokenizer from elsewhere is enough: the prefix tokens get the config's ids.
    judge = PairRMJudge.from_pretrained(hf, backbone=tiny_pairrm["backbone"], device="cpu")
    assert judge.source_prefix_id == json.loads((hf / "config.json").read_text())["source_prefix_id"]


def test_error_for_weights_that_do_not_fit(tiny_pairrm: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(tiny_pairrm["hf"], folder)
    state = load_file(folder / "model.safetensors")
    del state["head_layer.4.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing .*head_layer.4.weight"):
        PairRMJudge.from_pretrained(folder, device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        PairRMJudge.from_pretrained(folder, device="cpu")


def test_hub_ids_go_through_snapshot_download(tiny_pairrm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []
    folders = {"llm-blender/PairRM": tiny_pairrm["ranker"], "microsoft/deberta-v3-large": tiny_pairrm["backbone"]}

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str] | None = None, **kwargs: object) -> str:
        calls.append((repo_id, allow_patterns))
        return str(folders[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    judge = PairRMJudge.from_pretrained("llm-blender/PairRM", backbone="microsoft/deberta-v3-large", device="cpu")
    assert judge.pairwise_logits("q", ["a", "b"]).shape == (2, 2)
    assert [repo for repo, _ in calls] == ["llm-blender/PairRM", "microsoft/deberta-v3-large"]
    assert all(not any(p.endswith((".bin", ".safetensors")) for p in patterns) for repo, patterns in calls[1:])

    def offline(repo_id: str, **kwargs: object) -> str:
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="hf download llm-blender/PairRM"):
        PairRMJudge.from_pretrained("llm-blender/PairRM", device="cpu")
