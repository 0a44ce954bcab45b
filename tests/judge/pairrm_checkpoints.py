"""Random PairRM checkpoints in both published layouts, built offline from a seed.

Imported by tests/judge/test_pairrm.py (transformers 5), by fixtures/make_pairrm_parity.py
(run in a throw-away venv with llm-blender 0.0.2 and transformers 4.46.3) and by
benchmarks/judge_throughput.py, so it uses nothing from spo_ray and nothing version-specific:
configs are written as plain JSON and weights are drawn in sorted-key order from a seeded
generator, so both transformers versions rebuild bit-identical weights.

Folders written under `root`:
  backbone/  a DeBERTa-v2 config, the tiny SentencePiece tokenizer and random weights (llm-blender
             loads the backbone's weights before overwriting them with the ranker's)
  ranker/    llm-blender/PairRM layout: RankerConfig JSON (model_name → backbone/) + weights
  hf/        llm-blender/PairRM-hf layout: self-contained DeBERTa-v2 config with prefix ids,
             weights and the tokenizer with the four prefix tokens added, saved as transformers 4
             saved the hub's (spm.model beside a tokenizer.json that normalizes with its charsmap)
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_SPM = FIXTURES / "tiny_spm.model"
PREFIX_TOKENS = ("<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>")


def deberta_config(hidden: int = 32, layers: int = 2, heads: int = 4, position_buckets: int = 16) -> dict:
    """A DeBERTa-v3-style config (relative attention, log buckets, shared keys); sizes as asked."""
    return {
        "model_type": "deberta-v2",
        "architectures": ["DebertaV2Model"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,  # non-zero: the judge must run in eval mode
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512,
        "type_vocab_size": 0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-7,
        "relative_attention": True,
        "max_relative_positions": -1,
        "position_buckets": position_buckets,
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "pad_token_id": 0,
        "vocab_size": 121,  # the tiny SentencePiece model's 120 pieces + [MASK]
    }


def random_state(config: dict, vocab_size: int, seed: int, prefix: str = "pretrained_model.") -> dict[str, torch.Tensor]:
    """Seeded weights for DebertaV2Model (+ PairRM head when prefix is set), version-independent."""
    from transformers import DebertaV2Config, DebertaV2Model

    cfg = DebertaV2Config(**{k: v for k, v in config.items() if k != "model_type"})
    cfg.vocab_size = vocab_size
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DebertaV2Model(cfg).state_dict().items() if not k.endswith("position_ids")}
    hidden = config["hidden_size"]
    shapes = {prefix + k: s for k, s in shapes.items()}
    if prefix:
        shapes.update({
            "head_layer.1.weight": (hidden, 2 * hidden),
            "head_layer.1.bias": (hidden,),
            "head_layer.4.weight": (1, hidden),
            "head_layer.4.bias": (1,),
        })
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        noise = torch.randn(shapes[key], generator=gen, dtype=torch.float32)
        if "LayerNorm.weight" in key:
            state[key] = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            state[key] = 0.1 * noise
        else:  # std ~ 1/sqrt(fan_in) keeps activations O(1) at any width
            fan_in = shapes[key][-1] if len(shapes[key]) > 1 else 1
            state[key] = noise * (1.0 if "embeddings" in key else fan_in**-0.5)
    return state


def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def _write_backbone(folder: Path, config: dict, seed: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(TINY_SPM, folder / "spm.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False, "vocab_type": "spm"}))
    save_file(random_state(config, config["vocab_size"], seed + 1, prefix=""), str(folder / "model.safetensors"), metadata={"format": "pt"})


def build_random_pairrm(root: Path, seed: int = 0, with_hf: bool = True, **size: int) -> dict[str, object]:
    """Write backbone/, ranker/ and (with_hf) hf/ under root; returns their paths and the weights' digest."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    root = Path(root)
    config = deberta_config(**size)
    _write_backbone(root / "backbone", config, seed)
    tokenizer = AutoTokenizer.from_pretrained(root / "backbone")
    tokenizer.add_tokens(list(PREFIX_TOKENS))  # what llm-blender's collator does
    prefix_ids = tokenizer.convert_tokens_to_ids(list(PREFIX_TOKENS))
    state = random_state(config, len(tokenizer), seed)

    ranker = root / "ranker"
    ranker.mkdir(parents=True, exist_ok=True)
    ranker_config = {  # llm-blender's RankerConfig fields, values as in llm-blender/PairRM
        "ranker_type": "pairranker", "model_type": "deberta", "model_name": str(root / "backbone"),
        "cache_dir": None, "load_checkpoint": None, "source_maxlength": 1224, "candidate_maxlength": 412,
        "n_tasks": 1, "num_pos": 5, "num_neg": 5, "sub_sampling_mode": "all_pair", "sub_sampling_ratio": 0.4,
        "loss_type": "instructgpt", "reduce_type": "linear", "inference_mode": "bubble", "drop_out": 0.05,
        "fp16": True, "device": None,
    }
    (ranker / "config.json").write_text(json.dumps(ranker_config, indent=2))
    save_file(state, str(ranker / "model.safetensors"), metadata={"format": "pt"})

    hf = root / "hf"
    if not with_hf:
        return {"backbone": root / "backbone", "ranker": ranker, "digest": state_digest(state)}
    hf.mkdir(parents=True, exist_ok=True)
    hf_config = dict(config, architectures=["DebertaV2PairRM"], vocab_size=len(tokenizer), n_tasks=1, drop_out=0.05,
                     sep_token_id=tokenizer.sep_token_id, **dict(zip(
                         ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id"), prefix_ids)))
    (hf / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(hf)
    _as_transformers4_saved(hf)
    return {"backbone": root / "backbone", "ranker": ranker, "hf": hf, "digest": state_digest(state)}


def sentencepiece_normalizer_json(spm_model: Path) -> dict:
    """tokenizer.json's normalizer as transformers 4's DeBERTa-v2 converter wrote it from `spm_model`."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model.read_bytes())
    charsmap = base64.b64encode(proto.normalizer_spec.precompiled_charsmap).decode()
    return {"type": "Sequence", "normalizers": [
        {"type": "Strip", "strip_left": True, "strip_right": True},
        {"type": "Precompiled", "precompiled_charsmap": charsmap},
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "},
    ]}


def _as_transformers4_saved(hf: Path) -> None:
    """transformers 5 saves a DeBERTa-v2 tokenizer without spm.model and with its own NFC
    normalizer in tokenizer.json; llm-blender/PairRM-hf, saved with transformers 4, has both the
    model and the charsmap normalizer. Write them so, whichever version builds the folder."""
    shutil.copy(TINY_SPM, hf / "spm.model")
    tokenizer_json = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["normalizer"] = sentencepiece_normalizer_json(TINY_SPM)
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
