"""Loading a PairRM checkpoint in either hub layout: `llm-blender/PairRM` (ranker layout: the
weights, a ranker config and a DeBERTa-v3 backbone for architecture and tokenizer) or
`llm-blender/PairRM-hf` (a self-contained deberta-v2 folder). Local folders are read as they
are; hub ids are fetched with `huggingface_hub.snapshot_download` (see docs/pairrm.md).

The tokenizer normalizes text as llm-blender's did, with the checkpoint's own sentencepiece
charsmap (NFKC), not with the NFC that transformers 5 builds DeBERTa-v2 tokenizers with."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from spo_ray.dtypes import torch_dtype
from spo_ray.judge.pairrm_model import PAIRRM_CANDIDATE_MAXLENGTH, PAIRRM_SOURCE_MAXLENGTH, PREFIX_TOKENS, PairRMModel

logger = logging.getLogger(__name__)

_RANKER_CONFIG_FILES = ("ranker_config.json", "config.json")
_HF_PREFIX_FIELDS = ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id")
_TOKENIZER_FILES = ("tokenizer.json", "spm.model", "tokenizer.model", "vocab.txt", "vocab.json")
_SENTENCEPIECE_FILES = ("spm.model", "tokenizer.model")
# What a hub download fetches: the backbone needs no weights (PairRM has them all); the
# checkpoint's .bin is fetched only when it has no safetensors.
_BACKBONE_PATTERNS = ["*.json", "*.model", "*.txt"]
_CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


def load_pairrm(
    name_or_path: str | os.PathLike,
    *,
    device: torch.device,
    dtype: str | torch.dtype | None = None,
    backbone: str | os.PathLike | None = None,
) -> tuple[PairRMModel, Any, dict[str, int]]:
    """The model (on `device`, in `dtype`), its tokenizer (with the prefix tokens and the
    checkpoint's own normalization, see `_use_checkpoint_normalization`) and the
    checkpoint's length limits (`source_maxlength`, `candidate_maxlength`);
    `PairRMJudge.from_pretrained` documents the arguments."""
    resolved = _resolve_dtype(dtype, device)
    folder = _local_folder(name_or_path, allow_patterns=_CHECKPOINT_PATTERNS)
    if not Path(name_or_path).expanduser().is_dir() and not any(folder.glob("*.safetensors")):
        folder = _local_folder(name_or_path, allow_patterns=["*.bin"])
    layout, meta = _detect_layout(folder)
    if layout == "ranker":
        model, tokenizer, lengths = _load_ranker_layout(folder, meta, backbone)
    else:
        model, tokenizer, lengths = _load_hf_layout(folder, meta, backbone)
    if device.type == "cpu" and resolved != torch.float32:
        logger.warning("PairRM in %s on CPU: most CPUs have no fast matmul for it; use float32", resolved)
    model = model.to(device=device, dtype=resolved)
    logger.info("loaded PairRM (%s layout) from %s on %s in %s", layout, folder, device, resolved)
    return model, tokenizer, lengths


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
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        raise OSError(f"could not load the tokenizer in {folder} ({what}): {err}") from err
    _use_checkpoint_normalization(tokenizer, folder)
    return tokenizer


def _use_checkpoint_normalization(tokenizer: Any, folder: Path) -> None:
    """Give `tokenizer` the normalizer llm-blender 0.0.2 ran: transformers 4's conversion of the
    DeBERTa-v2 sentencepiece model (strip, the model's precompiled charsmap, runs of spaces to one).

    DeBERTa-v3's charsmap is NFKC ('…' → '...', no-break space → space, '½' → '1⁄2', 'ﬁ' → 'fi');
    transformers 5 rebuilds DeBERTa-v2 tokenizers with NFC and its own whitespace rules instead,
    ignoring both the charsmap and tokenizer.json's normalizer, which moves PairRM's logits.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a sentencepiece-backed tokenizer normalizes as its model says
        return
    charsmap = _precompiled_charsmap(folder)
    if charsmap is None:
        logger.warning(
            "%s has no sentencepiece model (%s) and no tokenizer.json with a Precompiled normalizer: PairRM "
            "texts are normalized as transformers builds the tokenizer (%s), not with the checkpoint's NFKC "
            "charsmap, so characters like '…' or a no-break space score differently than in llm-blender; "
            "copy the checkpoint's spm.model into that folder",
            folder, " or ".join(_SENTENCEPIECE_FILES), backend.normalizer,
        )
        return
    from tokenizers import Regex, normalizers

    steps = [normalizers.Lowercase()] if getattr(tokenizer, "do_lower_case", False) else []
    steps.append(normalizers.Strip())
    if charsmap:  # a model trained with the identity rule has none
        steps.append(normalizers.Precompiled(charsmap))
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    backend.normalizer = normalizers.Sequence(steps)


def _precompiled_charsmap(folder: Path) -> bytes | None:
    """The sentencepiece charsmap of a tokenizer folder: from tokenizer.json's Precompiled
    normalizer (what transformers 4 read first), else from the sentencepiece model; None if neither."""
    if (folder / "tokenizer.json").is_file():
        charsmap = _charsmap_in_normalizer(_read_json(folder / "tokenizer.json").get("normalizer"))
        if charsmap is not None:
            return charsmap
    for name in _SENTENCEPIECE_FILES:
        if (folder / name).is_file():
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString((folder / name).read_bytes())
            return proto.normalizer_spec.precompiled_charsmap
    return None


def _charsmap_in_normalizer(normalizer: dict[str, Any] | None) -> bytes | None:
    if not normalizer:
        return None
    if normalizer.get("type") == "Precompiled" and normalizer.get("precompiled_charsmap"):
        return base64.b64decode(normalizer["precompiled_charsmap"])
    for step in normalizer.get("normalizers") or []:  # a Sequence
        charsmap = _charsmap_in_normalizer(step)
        if charsmap is not None:
            return charsmap
    return None


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
