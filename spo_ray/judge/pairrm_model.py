"""The PairRM network: a DeBERTa-v2 encoder and llm-blender's comparison head, with the prefix
tokens and length limits that the checkpoints and the judge share (spo_ray/judge/pairrm.py
says what it computes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
