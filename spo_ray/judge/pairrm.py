"""PairRM (llm-blender/PairRM) as a native judge: same logits as llm-blender, current libraries.

PairRM (Jiang et al., 2023, "LLM-Blender", arXiv 2306.02561) is a DeBERTa-v3-large cross
encoder that reads one prompt and two responses side by side:

    [CLS] <|source|> prompt [SEP] [CLS] <|candidate1|> y_i [SEP] [CLS] <|candidate2|> y_j [SEP]

and scores each response from the last hidden states at the three prefix tokens:
M[i, j] = head([h_src; h_c1]) − head([h_src; h_c2]), head = Linear(2H, H) → tanh → Linear(H, 1).

This module reproduces llm-blender 0.0.2's `CrossCompareCollator` and
`CrossCompareReranker._full_predict` (what `Blender.rank` runs) token for token, with one
deliberate difference: llm-blender cuts every candidate of a batch to
`candidate_maxlength + (source_maxlength − Ls) // 2` tokens with Ls the longest *source in its
batch*, so its scores depend on which prompts share a batch. Here Ls is always the prompt's own
source length, which is llm-blender's batch_size=1 result (the setting of the SPPO paper's
scripts), however the work is batched. See docs/pairrm.md.

Speed comes from running the K(K−1) ordered pairs of all prompts of a call as a few
length-sorted, dynamically padded forward passes under `torch.inference_mode`, each holding at
most `token_budget` tokens (padding included).

The judge takes the prompt text exactly as given; applying the policy's chat template
(`judge.prompt_format: chat`) is the judge stage's job.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from spo_ray.dtypes import torch_dtype
from spo_ray.judge.base import scores_from_logits

logger = logging.getLogger(__name__)

SOURCE_PREFIX = "<|source|>"
CANDIDATE1_PREFIX = "<|candidate1|>"
CANDIDATE2_PREFIX = "<|candidate2|>"
CANDIDATE_PREFIX = "<|candidate|>"
# The order in which llm-blender's collator adds them to the tokenizer (it decides their ids).
PREFIX_TOKENS = (SOURCE_PREFIX, CANDIDATE1_PREFIX, CANDIDATE2_PREFIX, CANDIDATE_PREFIX)

# llm-blender/PairRM's RankerConfig values. The ranker layout carries them in its config; the
# PairRM-hf layout does not, and its model card uses these same numbers.
PAIRRM_SOURCE_MAXLENGTH = 1224
PAIRRM_CANDIDATE_MAXLENGTH = 412
# For direct use; the pipeline passes judge.pairrm.token_budget from conf/.
DEFAULT_TOKEN_BUDGET = 16384

_RANKER_CONFIG_FILES = ("ranker_config.json", "config.json")
_HF_PREFIX_FIELDS = ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id")
_TOKENIZER_FILES = ("tokenizer.json", "spm.model", "tokenizer.model", "vocab.txt", "vocab.json")
# What a hub download fetches: the backbone needs no weights (PairRM has them all); the
# checkpoint's .bin is fetched only when it has no safetensors.
_BACKBONE_PATTERNS = ["*.json", "*.model", "*.txt"]
_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


class PairRMModel(nn.Module):
    """DeBERTa-v2 encoder + llm-blender's head; parameter names match both published layouts.

    The encoder runs through `_encode` below: transformers' own embedding, projection and
    feed-forward modules around a re-arranged disentangled attention that makes fewer passes
    over the [heads, L, L] scores; `reference=True` runs `DebertaV2Model.forward` itself
    (the tests hold the two within 1e-5).
    """

    def __init__(self, config: Any, n_tasks: int = 1) -> None:
        super().__init__()
        from transformers import DebertaV2Model

        self.pretrained_model = DebertaV2Model(config)
        hidden = config.hidden_size
        # Dropout slots kept so that `head_layer.1` / `head_layer.4` match the checkpoints' keys.
        self.head_layer = nn.Sequential(
            nn.Dropout(0.0), nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Dropout(0.0), nn.Linear(hidden, n_tasks)
        )
        self.fast = _fast_path_supported(config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_positions: torch.Tensor,
        reference: bool = False,
    ) -> torch.Tensor:
        """[B] logits that candidate 1 beats candidate 2; `prefix_positions` [B, 3] = (src, c1, c2)."""
        if self.fast and not reference:
            source, cand1, cand2 = self._encode(input_ids, attention_mask, prefix_positions).unbind(dim=1)
        else:
            hidden = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
            source, cand1, cand2 = hidden[rows, prefix_positions].unbind(dim=1)
        left = self.head_layer(torch.cat([source, cand1], dim=-1))
        right = self.head_layer(torch.cat([source, cand2], dim=-1))
        return (left - right).mean(dim=-1)

    def _encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """DebertaV2Model's last hidden states at `positions` [B, P] → [B, P, H].

        Same layers, same weights; the attention is `_disentangled_attention`, and the last
        layer runs its queries, output projection and feed-forward for those P rows only
        (the head reads nothing else).
        """
        deberta = self.pretrained_model
        encoder = deberta.encoder
        hidden = deberta.embeddings(
            input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), mask=attention_mask
        )
        dtype = hidden.dtype
        # Padding is masked on the key side only; padded query rows are never read.
        pad = None
        if not bool(attention_mask.all()):
            pad = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        rel = encoder.get_rel_embedding()
        index = _relative_index(
            input_ids.shape[1], encoder.position_buckets, encoder.max_relative_positions, input_ids.device
        )
        last = len(encoder.layer) - 1
        for n, layer in enumerate(encoder.layer):
            query_positions = positions if n == last else None
            context = _disentangled_attention(layer.attention.self, hidden, rel, index, pad, query_positions)
            if query_positions is not None:
                hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], query_positions]
            attention_output = layer.attention.output(context, hidden)
            hidden = layer.output(layer.intermediate(attention_output), attention_output)
        return hidden


def _fast_path_supported(config: Any) -> bool:
    """The DeBERTa-v3 family (PairRM's backbone); anything else runs transformers' forward."""
    pos = set(config.pos_att_type or [])
    return (
        bool(getattr(config, "relative_attention", False))
        and pos <= {"c2p", "p2c"}
        and getattr(config, "conv_kernel_size", 0) == 0
        and getattr(config, "attention_head_size", config.hidden_size // config.num_attention_heads)
        * config.num_attention_heads
        == config.hidden_size
    )


def _relative_index(length: int, buckets: int, max_position: int, device: torch.device) -> torch.Tensor:
    """[L, L] row of the relative-embedding table that query i reads for key j.

    DeBERTa's c2p term reads row c(i − j) = clamp(bucket(i − j) + span) for query i and key j,
    and since bucket is odd its p2c term reads the same row c(i − j) (transformers computes it
    as the transpose of a gather at clamp(span − bucket(j − i))).
    """
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    positions = torch.arange(length, device=device)
    relative = positions[:, None] - positions[None, :]
    span = buckets if buckets > 0 else max_position
    if buckets > 0:
        relative = make_log_bucket_position(relative, buckets, max_position).long()
    return torch.clamp(relative + span, 0, 2 * span - 1)


def _disentangled_attention(
    att: Any,
    hidden: torch.Tensor,
    rel: torch.Tensor,
    index: torch.Tensor,
    pad: torch.Tensor | None,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """DisentangledSelfAttention.forward in eval mode, with fewer passes over [B, heads, L, L].

    scores[i, j] = (q_i·k_j + q_i·Kr[c(i, j)] + k_j·Qr[c(i, j)]) / sqrt(d · (1 + #pos terms)),
    Kr, Qr the key/query projections of the layer-normed relative embeddings. Both position
    terms are gathered straight into one bias (p2c along rows, so no transposed copy), the scale
    is folded into Kr and Qr, and SDPA fuses q·k, the bias, softmax and the value product.
    With `query_positions` [B, P] only those rows are queried: the output is [B, P, H].
    """
    batch, length, _ = hidden.shape
    heads, size = att.num_attention_heads, att.attention_head_size

    def split(x: torch.Tensor) -> torch.Tensor:  # [B, L, H] → [B, heads, L, d]
        return x.view(x.shape[0], -1, heads, size).transpose(1, 2)

    queries = hidden
    index = index.expand(batch, length, length)
    if query_positions is not None:
        rows = torch.arange(batch, device=hidden.device)[:, None]
        queries, index = hidden[rows, query_positions], index[rows, query_positions]
    q, k, v = split(att.query_proj(queries)), split(att.key_proj(hidden)), split(att.value_proj(hidden))
    scale = (size * (1 + len(att.pos_att_type))) ** -0.5
    rel = rel[: 2 * att.pos_ebd_size].unsqueeze(0)
    index = index.unsqueeze(1).expand(batch, heads, q.shape[2], length)
    bias = None
    if "c2p" in att.pos_att_type:
        pos_key = split(att.key_proj(rel) if att.share_att_key else att.pos_key_proj(rel)) * scale
        bias = torch.gather(q @ pos_key.transpose(-1, -2), -1, index)
    if "p2c" in att.pos_att_type:
        pos_query = split(att.query_proj(rel) if att.share_att_key else att.pos_query_proj(rel)) * scale
        p2c = torch.gather(pos_query @ k.transpose(-1, -2), -2, index)
        bias = p2c if bias is None else bias.add_(p2c)
    if pad is not None:
        bias = pad.expand(index.shape).contiguous() if bias is None else bias.add_(pad)
    context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return context.transpose(1, 2).reshape(batch, q.shape[2], heads * size)


@dataclass(frozen=True)
class _Encoded:
    """One prompt, tokenized and truncated as llm-blender does at batch_size=1."""

    source: list[int]
    candidates: list[list[int]]  # each starts [CLS] <|candidate|>


class PairRMJudge:
    """The Judge protocol (`spo_ray.judge.base.Judge`) backed by a PairRM checkpoint."""

    def __init__(
        self,
        model: PairRMModel,
        tokenizer: Any,
        *,
        source_maxlength: int = PAIRRM_SOURCE_MAXLENGTH,
        candidate_maxlength: int = PAIRRM_CANDIDATE_MAXLENGTH,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        device: str | torch.device = "cpu",
    ) -> None:
        if token_budget <= 0:
            raise ValueError(f"token_budget must be a positive number of tokens, got {token_budget}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source_maxlength = source_maxlength
        self.candidate_maxlength = candidate_maxlength
        self.token_budget = token_budget
        self.device = torch.device(device)
        self.sep_token = tokenizer.sep_token
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = tokenizer.convert_tokens_to_ids(list(PREFIX_TOKENS))
        self.source_prefix_id, self.cand1_prefix_id, self.cand2_prefix_id, self.cand_prefix_id = ids
        vocab = model.pretrained_model.config.vocab_size
        if any(i is None or i == tokenizer.unk_token_id or i >= vocab for i in ids):
            raise ValueError(
                f"tokenizer gives prefix-token ids {dict(zip(PREFIX_TOKENS, ids))} that the checkpoint "
                f"(vocab {vocab}) cannot embed: tokenizer and weights do not belong together"
            )

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        backbone: str | os.PathLike | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> "PairRMJudge":
        """Load `llm-blender/PairRM` (ranker layout) or `llm-blender/PairRM-hf` (hf layout).

        `name_or_path` is a local folder (no network used) or a hub id (fetched with
        `huggingface_hub.snapshot_download`, which honours HF_HUB_OFFLINE and the cache).
        `backbone` replaces the ranker config's `model_name` (microsoft/deberta-v3-large) as the
        source of the architecture config and tokenizer; for the hf layout it is only used when
        the checkpoint folder has no tokenizer. `dtype` is "float32" | "bfloat16" | "float16" or
        a torch dtype (default: float32 on CPU, bfloat16 on CUDA).
        """
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = _resolve_dtype(dtype, device)
        folder = _local_folder(name_or_path, allow_patterns=_CHECKPOINT_PATTERNS)
        if not Path(name_or_path).expanduser().is_dir() and not any(folder.glob("*.safetensors")):
            folder = _local_folder(name_or_path, allow_patterns=["*.bin"])
        layout, meta = _detect_layout(folder)
        if layout == "ranker":
            model, tokenizer, lengths = _load_ranker_layout(folder, meta, backbone)
        else:
            model, tokenizer, lengths = _load_hf_layout(folder, meta, backbone)
        if device.type == "cpu" and torch_dtype != torch.float32:
            logger.warning("PairRM in %s on CPU: most CPUs have no fast matmul for it; use float32", torch_dtype)
        model = model.to(device=device, dtype=torch_dtype)
        logger.info("loaded PairRM (%s layout) from %s on %s in %s", layout, folder, device, torch_dtype)
        return cls(model, tokenizer, **lengths, token_budget=token_budget, device=device)

    # ----------------------------------------------------------------------------- scoring
    def pairwise_logits(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        """[K, K] float32, M[i, j] = logit that responses[i] beats responses[j], diagonal 0."""
        return self.batch_pairwise_logits([prompt], [responses])[0]

    def batch_pairwise_logits(
        self, prompts: Sequence[str], responses: Sequence[Sequence[str]]
    ) -> list[torch.Tensor]:
        """One [K_n, K_n] matrix per prompt, equal to `pairwise_logits` per prompt."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
        encoded = [self._encode(p, r) for p, r in zip(prompts, responses)]
        sizes = [len(e.candidates) for e in encoded]
        pairs = [(n, i, j) for n, k in enumerate(sizes) for i in range(k) for j in range(k) if i != j]
        logits = self._run_pairs(encoded, pairs)
        out = [torch.zeros(k, k) for k in sizes]
        for (n, i, j), value in zip(pairs, logits.tolist()):
            out[n][i, j] = value
        return out

    def scores(self, prompt: str, responses: Sequence[str]) -> torch.Tensor:
        """[K] PairRM scores s_i = (1/K) Σ_j (M[i, j] − M[j, i]) (llm-blender's `rank` scores)."""
        return scores_from_logits(self.pairwise_logits(prompt, responses))

    def compare(
        self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
    ) -> torch.Tensor:
        """[N] M[A, B] − M[B, A]: > 0 means A wins (llm-blender's `compare(..., return_logits=True)`)."""
        if not len(prompts) == len(responses_a) == len(responses_b):
            lengths = (len(prompts), len(responses_a), len(responses_b))
            raise ValueError(f"compare needs as many prompts as responses_a and responses_b, got {lengths}")
        encoded = [self._encode(p, [a, b]) for p, a, b in zip(prompts, responses_a, responses_b)]
        pairs = [(n, i, 1 - i) for n in range(len(encoded)) for i in (0, 1)]
        logits = self._run_pairs(encoded, pairs).view(-1, 2)
        return logits[:, 0] - logits[:, 1]

    # ----------------------------------------------------------------------------- internals
    def _clean(self, text: str) -> str:
        # llm-blender turns a literal separator inside any text into a space.
        return text.replace(self.sep_token, " ") if self.sep_token else text

    def _encode(self, prompt: str, responses: Sequence[str]) -> _Encoded:
        tok = self.tokenizer
        source_text = self._clean(SOURCE_PREFIX + prompt)
        source = tok(source_text, truncation=True, max_length=self.source_maxlength)["input_ids"]
        limit = self.candidate_maxlength + (self.source_maxlength - len(source)) // 2
        texts = [self._clean(CANDIDATE_PREFIX + r) for r in responses]
        candidates = tok(texts, truncation=True, max_length=limit)["input_ids"] if texts else []
        # The head reads position 1 of each segment: the prefix token must sit there.
        for ids, prefix in [(source, self.source_prefix_id)] + [(c, self.cand_prefix_id) for c in candidates]:
            if len(ids) < 3 or ids[1] != prefix:
                raise RuntimeError(f"tokenizer did not put prefix id {prefix} second: {ids[:4]}")
        return _Encoded(source=list(source), candidates=[list(c) for c in candidates])

    def _pair_ids(self, e: _Encoded, i: int, j: int) -> tuple[list[int], tuple[int, int, int]]:
        swap = lambda ids, new: [new if t == self.cand_prefix_id else t for t in ids]  # noqa: E731
        c1 = swap(e.candidates[i], self.cand1_prefix_id)
        c2 = swap(e.candidates[j], self.cand2_prefix_id)
        ls = len(e.source)
        return e.source + c1 + c2, (1, ls + 1, ls + len(c1) + 1)

    def _run_pairs(self, encoded: Sequence[_Encoded], pairs: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Logit per (prompt, i, j) pair, in the order given, from budgeted padded batches."""
        rows = [self._pair_ids(encoded[n], i, j) for n, i, j in pairs]
        result = torch.zeros(len(rows), dtype=torch.float32)
        # Longest first: a batch's padded width is its first row's length.
        order = sorted(range(len(rows)), key=lambda r: (-len(rows[r][0]), r))
        start = 0
        with torch.inference_mode():
            while start < len(order):
                width = len(rows[order[start]][0])
                size = max(1, min(len(order) - start, self.token_budget // width))
                batch = order[start : start + size]
                result[batch] = self._forward([rows[r] for r in batch], width).float().cpu()
                start += size
        return result

    def _forward(self, rows: Sequence[tuple[list[int], tuple[int, int, int]]], width: int) -> torch.Tensor:
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
        positions = torch.tensor([p for _, p in rows], dtype=torch.long)
        return self.model(input_ids.to(self.device), attention_mask.to(self.device), positions.to(self.device))


# --------------------------------------------------------------------------------- loading
def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(dtype)


def _local_folder(name_or_path: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is; anything else is a hub id, fetched (or found in the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name_or_path!s} is neither a local folder nor a hub id like llm-blender/PairRM")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns))
    except Exception as err:  # offline, gated, misspelt: say what to do
        raise OSError(
            f"could not fetch {name_or_path} from the hub ({type(err).__name__}: {err}). On an offline "
            f"machine, download it beforehand (`hf download {name_or_path}`, or `huggingface-cli download "
            f"{name_or_path}` with an older huggingface_hub) and set HF_HUB_OFFLINE=1, or pass a local "
            f"folder; see docs/pairrm.md"
        ) from err


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _detect_layout(folder: Path) -> tuple[str, dict[str, Any]]:
    for name in _RANKER_CONFIG_FILES:
        if (folder / name).is_file():
            meta = _read_json(folder / name)
            if "ranker_type" in meta:
                if meta["ranker_type"] != "pairranker" or not str(meta.get("model_type", "")).startswith("deberta"):
                    raise ValueError(
                        f"{folder / name}: ranker_type={meta['ranker_type']!r}, model_type={meta.get('model_type')!r}; "
                        "only llm-blender's DeBERTa pairranker (PairRM) is supported"
                    )
                return "ranker", meta
    if (folder / "config.json").is_file():
        meta = _read_json(folder / "config.json")
        if meta.get("model_type") == "deberta-v2" and all(k in meta for k in _HF_PREFIX_FIELDS[:3]):
            return "hf", meta
    raise ValueError(
        f"{folder} is not a PairRM checkpoint: expected either llm-blender/PairRM's layout (a config.json or "
        f"ranker_config.json with ranker_type 'pairranker' and model_name) or llm-blender/PairRM-hf's layout "
        f"(a deberta-v2 config.json with {', '.join(_HF_PREFIX_FIELDS[:3])})"
    )


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (or its sharded index), else pytorch_model.bin with weights_only=True."""
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        shards = sorted(set(_read_json(folder / "model.safetensors.index.json")["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no model.safetensors(.index.json) or pytorch_model.bin")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES)


def _load_tokenizer(folder: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    if not _has_tokenizer(folder):
        raise FileNotFoundError(
            f"no tokenizer in {folder} ({what}): expected one of {', '.join(_TOKENIZER_FILES)}. Pass "
            "backbone=<a local copy of microsoft/deberta-v3-large> (its spm.model and tokenizer_config.json)"
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise OSError(f"could not load the tokenizer in {folder} ({what}): {err}") from err


def _build_model(config: Any, state: dict[str, torch.Tensor], n_tasks: int, folder: Path) -> PairRMModel:
    config.vocab_size = state["pretrained_model.embeddings.word_embeddings.weight"].shape[0]
    model = PairRMModel(config, n_tasks=n_tasks)
    # Old checkpoints may carry the non-persistent position_ids buffer; nothing else is ignored.
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights in {folder} do not fit a PairRM of this config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model


def _load_ranker_layout(
    folder: Path, meta: dict[str, Any], backbone: str | os.PathLike | None
) -> tuple[PairRMModel, Any, dict[str, int]]:
    from transformers import AutoConfig

    backbone = backbone if backbone is not None else meta.get("model_name")
    if not backbone:
        raise ValueError(f"{folder}: ranker config has no model_name; pass backbone=<DeBERTa-v3 folder>")
    backbone_dir = _local_folder(backbone, allow_patterns=_BACKBONE_PATTERNS)
    if not (backbone_dir / "config.json").is_file():
        raise FileNotFoundError(f"backbone {backbone_dir} has no config.json (the DeBERTa-v3 architecture)")
    config = AutoConfig.from_pretrained(backbone_dir)
    if config.model_type != "deberta-v2":
        raise ValueError(f"backbone {backbone_dir} is a {config.model_type!r} model; PairRM needs deberta-v2")
    tokenizer = _load_tokenizer(backbone_dir, "the ranker layout's backbone")
    tokenizer.add_tokens(list(PREFIX_TOKENS))  # as llm-blender's CrossCompareCollator does
    model = _build_model(config, _load_state_dict(folder), int(meta.get("n_tasks", 1)), folder)
    lengths = {
        "source_maxlength": int(meta.get("source_maxlength") or PAIRRM_SOURCE_MAXLENGTH),
        "candidate_maxlength": int(meta.get("candidate_maxlength") or PAIRRM_CANDIDATE_MAXLENGTH),
    }
    return model, tokenizer, lengths


def _load_hf_layout(
    folder: Path, meta: dict[str, Any], backbone: str | os.PathLike | None
) -> tuple[PairRMModel, Any, dict[str, int]]:
    from transformers import DebertaV2Config

    config = DebertaV2Config.from_pretrained(folder)
    if _has_tokenizer(folder) or backbone is None:
        tokenizer = _load_tokenizer(folder, "the PairRM-hf layout")
    else:
        tokenizer = _load_tokenizer(_local_folder(backbone, allow_patterns=_BACKBONE_PATTERNS), "backbone=")
    missing = [t for t in PREFIX_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens(missing)
    # _HF_PREFIX_FIELDS is in PREFIX_TOKENS' order.
    expected = {t: meta.get(f) for t, f in zip(PREFIX_TOKENS, _HF_PREFIX_FIELDS)}
    actual = dict(zip(PREFIX_TOKENS, tokenizer.convert_tokens_to_ids(list(PREFIX_TOKENS))))
    wrong = {t: (expected[t], actual[t]) for t in PREFIX_TOKENS if expected[t] is not None and expected[t] != actual[t]}
    if wrong:
        raise ValueError(f"{folder}: config prefix ids and tokenizer disagree (config, tokenizer): {wrong}")
    model = _build_model(config, _load_state_dict(folder), int(meta.get("n_tasks", 1)), folder)
    lengths = {
        "source_maxlength": int(meta.get("source_maxlength") or PAIRRM_SOURCE_MAXLENGTH),
        "candidate_maxlength": int(meta.get("candidate_maxlength") or PAIRRM_CANDIDATE_MAXLENGTH),
    }
    return model, tokenizer, lengths
