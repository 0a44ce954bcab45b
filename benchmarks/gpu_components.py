"""The components on one GPU: generation tokens/s, PairRM pairs/s, one learner step with MFU.

For a bare GPU machine (DESIGN.md §5): PyTorch, transformers, safetensors, sentencepiece,
pyarrow and pyyaml only — no Ray, vLLM, DeepSpeed or network. Every model is built from a config with
random weights, offline:

- generation: `HFEngine` (what `rollout.engine=hf` runs) on a policy of Qwen2.5-0.5B's
  shape (494M parameters, vocabulary 151,936, bf16), a batch of prompts, K samples each
  (K, temperature, top_p from conf/rollout/vllm.yaml). Random weights rarely emit EOS, so
  nearly every sample runs to --max-new-tokens: tokens/s is the decode rate at that length.
- judge: `PairRMJudge` at DeBERTa-v3-large's size (hidden 1024, 24 layers, 16 heads, 256
  position buckets; tests/judge/pairrm_checkpoints.py builds it), bf16, all K(K−1) ordered
  pairs of each prompt, token budget from conf/judge/pairrm.yaml. Its tokenizer is the tiny
  test SentencePiece model, so the vocabulary is small: the encoder's cost is unchanged.
- learner: one optimizer step of the SPPO loss (`spo_ray.sppo`) on a batch of pairs at the
  paper's lengths (conf/experiment/mistral7b_sppo.yaml: max_length, max_prompt_length, β):
  policy forward+backward under bf16 autocast, the frozen bf16 reference forward, RMSprop —
  the learner's own step (`spo_ray.learner.step.learner_step`) on a plain torch optimizer.
  MFU = 6·N·tokens / step time / peak bf16 FLOP/s (N = policy parameters, tokens = 2 ×
  pairs × max_length; attention FLOPs and the reference's 2·N·tokens not counted, the
  latter reported as `mfu_with_reference`). With `learner.shared_prompt` (the default) each
  pair runs as one sequence with its prompt once, so the step does less than those FLOPs:
  the MFU is of the two-sequence work it replaces.

    PYTHONPATH=. python benchmarks/gpu_components.py --out benchmarks/results/gpu_<device>.json
    PYTHONPATH=. python benchmarks/gpu_components.py --tiny    # small sizes: a CPU smoke run

Prints a table and writes JSON with the device name and the date. An estimated 2 minutes on
one H100 (model builds included; not yet measured); --tiny under a minute on 2 CPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import platform
import random
import re
import string
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "judge"))  # pairrm_checkpoints: the offline PairRM builder

from spo_ray.rollout.base import SamplingConfig  # noqa: E402
from spo_ray.rollout.hf import HFEngine  # noqa: E402
from spo_ray.learner.step import LearnerModels, TorchEngine, learner_step  # noqa: E402

# Dense bf16 tensor-core peaks (NVIDIA data sheets), matched in this order on the device name.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
NOT_HERE = ("ray", "vllm", "deepspeed", "hydra")  # must not be needed on the bare machine

# Qwen2.5-0.5B's shape; --tiny: a few layers of width 64.
POLICY = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096)
TINY_POLICY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, max_position_embeddings=512)
PAIRRM = dict(hidden=1024, layers=24, heads=16, position_buckets=256)  # DeBERTa-v3-large
TINY_PAIRRM = dict(hidden=32, layers=2, heads=4, position_buckets=16)
WORDS = ("the model answer step because value result first many people would like this code which list "
         "summary reason example time state world long good make work same write explain table").split()


def peak_bf16_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def conf(*path: str) -> dict:
    return yaml.safe_load((REPO / "conf").joinpath(*path).read_text())


def group(name: str, option: str) -> dict:
    """A flat conf group's option as Hydra composes it (this machine may have no Hydra): the
    options its `defaults` list names from the same group (e.g. rollout/common.yaml), then
    its own keys."""
    own = conf(name, f"{option}.yaml")
    merged: dict = {}
    for entry in own.pop("defaults", []):
        if entry != "_self_":
            merged.update(group(name, entry))
    return {**merged, **own}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- the policy
def policy_tokenizer(vocab_size: int):
    """Characters for text, filler tokens up to the model's vocabulary, a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spo_ray.modeling import CHAT_TEMPLATE

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    tokens = specials + chars
    tokens += [f"<x{i}>" for i in range(vocab_size - len(tokens))]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<|user|>", "<|assistant|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_policy(shape: dict, tokenizer, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def words(rng: random.Random, target_len: int, measure) -> str:
    out: list[str] = []
    while measure(" ".join(out)) < target_len:
        out.append(rng.choice(WORDS))
    return " ".join(out)


# ----------------------------------------------------------------------------- the stages
def bench_generation(policy_dir: str, device: torch.device, dtype: str, sizes: dict) -> dict:
    rollout = group("rollout", "vllm")
    engine = HFEngine(policy_dir, dtype=dtype, device=str(device))
    rng = random.Random(0)
    prompts = [words(rng, sizes["prompt_chars"], len) for _ in range(sizes["prompts"])]
    sampling = SamplingConfig(num_samples=rollout["num_samples"], temperature=rollout["temperature"],
                              top_p=rollout["top_p"], max_new_tokens=sizes["max_new_tokens"], seed=0)
    engine.generate(prompts[:2], dataclasses.replace(sampling, max_new_tokens=4))  # warm-up
    reset_memory(device)
    runs = []
    for r in range(sizes["repeats"]):
        sync(device)
        t0 = time.perf_counter()
        rollouts = engine.generate(prompts, dataclasses.replace(sampling, seed=r))
        sync(device)
        runs.append((time.perf_counter() - t0, sum(sum(x.num_tokens) for x in rollouts),
                     sum(sum(x.truncated) for x in rollouts)))
    seconds = sum(r[0] for r in runs)
    tokens = sum(r[1] for r in runs)
    sequences = sizes["repeats"] * len(prompts) * sampling.num_samples
    # π_{t+1} into the same engine between iterations (the storage path of weight sync):
    # read the saved folder and copy into the loaded tensors.
    sync(device)
    t0 = time.perf_counter()
    engine.load_weights(policy_dir)
    sync(device)
    reload_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return {
        "engine": "HFEngine (transformers generate)",
        "prompts": len(prompts), "k": sampling.num_samples, "sequences_per_call": len(prompts) * sampling.num_samples,
        "prompt_tokens": sizes["prompt_chars"], "max_new_tokens": sizes["max_new_tokens"],
        "temperature": sampling.temperature, "top_p": sampling.top_p, "dtype": dtype,
        "seconds_per_call": round(seconds / len(runs), 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "sequences_per_s": round(sequences / seconds, 2),
        "truncated_fraction": round(sum(r[2] for r in runs) / sequences, 3),
        "in_place_reload_s": round(reload_s, 3),
        "in_place_reload_gb_per_s": round(weight_bytes / reload_s / 1e9, 2),
        "peak_memory_gib": peak_memory_gib(device),
    }


def bench_judge(root: Path, device: torch.device, dtype: str, size: dict, sizes: dict) -> dict:
    from pairrm_checkpoints import build_random_pairrm
    from transformers import AutoTokenizer

    from spo_ray.judge.pairrm import PairRMJudge

    kwargs = {"with_hf": False} if "with_hf" in inspect.signature(build_random_pairrm).parameters else {}
    t0 = time.perf_counter()
    paths = build_random_pairrm(root, seed=0, **kwargs, **size)
    build_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(paths["backbone"])
    n_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rng = random.Random(1)
    k = group("rollout", "vllm")["num_samples"]
    prompts = [words(rng, sizes["prompt_tokens"], n_tokens) for _ in range(sizes["prompts"])]
    responses = [[words(rng, sizes["response_tokens"], n_tokens) for _ in range(k)] for _ in prompts]
    budget = conf("judge", "pairrm.yaml")["pairrm"]["token_budget"]
    judge = PairRMJudge.from_pretrained(paths["ranker"], device=device, dtype=dtype, token_budget=budget)
    judge.batch_pairwise_logits(prompts[:1], responses[:1])  # warm-up
    reset_memory(device)
    pairs = len(prompts) * k * (k - 1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(sizes["repeats"]):
        judge.batch_pairwise_logits(prompts, responses)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "judge": "PairRMJudge", "size": size, "dtype": dtype, "token_budget": budget,
        "prompts": len(prompts), "k": k, "pairs_per_call": pairs,
        "prompt_tokens": sizes["prompt_tokens"], "response_tokens": sizes["response_tokens"],
        "seconds_per_call": round(seconds / sizes["repeats"], 3),
        "pairs_per_s": round(pairs * sizes["repeats"] / seconds, 1),
        "checkpoint_build_s": round(build_s, 1),
        "peak_memory_gib": peak_memory_gib(device),
    }


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The learner settings `learner_step` reads (spo_ray.learner.step.StepSettings), without Hydra."""

    loss: str
    beta: float
    micro_batch_size: int
    max_length: int
    max_prompt_length: int
    shared_prompt: bool


def bench_learner(policy, tokenizer, device: torch.device, autocast: bool, sizes: dict, peak: float | None) -> dict:
    learner = {**group("learner", "sppo"), **conf("experiment", "mistral7b_sppo.yaml")["learner"]}
    length, prompt_len, beta = learner["max_length"], learner["max_prompt_length"], learner["beta"]
    if sizes["max_length"]:  # --tiny
        length, prompt_len = sizes["max_length"], sizes["max_length"] // 2
    pairs = sizes["pairs"]
    shared = learner["shared_prompt"]  # the learner's default: the prompt once per pair
    settings = StepSettings(loss="sppo", beta=beta, micro_batch_size=pairs, max_length=length, max_prompt_length=prompt_len,
                            shared_prompt=shared)
    reference = build_reference(policy)
    policy.train()
    policy.config.use_cache = False
    optimizer = torch.optim.RMSprop(policy.parameters(), lr=5e-7)  # the paper's; speed does not depend on it
    models = LearnerModels(tokenizer, TorchEngine(policy, optimizer, autocast_dtype=torch.bfloat16 if autocast else None), reference)
    # The character tokenizer makes a token of each character: prompts fill max_prompt_length,
    # responses are cut so that every sequence is max_length tokens long.
    rng = random.Random(0)
    rows = [{"prompt_id": f"p{i}", "prompt": words(rng, prompt_len, len), "chosen": words(rng, length, len),
             "rejected": words(rng, length, len), "chosen_probs_win": rng.uniform(0.5, 1.0),
             "chosen_probs_lose": rng.uniform(0.0, 0.5), "skip_reason": ""} for i in range(pairs)]

    def step() -> float:
        return learner_step(models, [rows], settings).loss / pairs

    for _ in range(sizes["warmup"]):
        step()
    reset_memory(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(sizes["steps"]):
        loss = step()
    sync(device)
    step_s = (time.perf_counter() - t0) / sizes["steps"]
    n_params = sum(p.numel() for p in policy.parameters())
    tokens = 2 * pairs * length
    flops = 6 * n_params * tokens
    return {
        "loss": "sppo", "beta": beta, "optimizer": "RMSprop", "precision": "bf16 autocast" if autocast else "float32",
        "reference": "frozen copy, " + str(next(reference.parameters()).dtype).replace("torch.", ""),
        "step": "spo_ray.learner.step.learner_step on a TorchEngine",
        "pairs_per_step": pairs, "max_length": length, "max_prompt_length": prompt_len, "shared_prompt": shared,
        "tokens_per_step": tokens, "policy_parameters": n_params,
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 2),
        "mfu": round(flops / step_s / peak, 4) if peak else None,
        "mfu_with_reference": round(8 * n_params * tokens / step_s / peak, 4) if peak else None,
        "last_loss": loss,
        "peak_memory_gib": peak_memory_gib(device),
    }


def build_reference(policy):
    import copy

    dtype = torch.bfloat16 if next(policy.parameters()).device.type == "cuda" else torch.float32
    return copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- main
def stage(name: str, device: torch.device, fn, *args) -> dict:
    print(f"{name} …", flush=True)
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - reported in the JSON and the table
        print(f"{name} failed: {type(err).__name__}: {err}", flush=True)
        reset_memory(device)
        return {"error": f"{type(err).__name__}: {err}"}


def table(results: dict) -> str:
    def row(label: str, key: str, value, detail) -> tuple[str, str, str]:
        r = results[key]
        if "error" in r:
            return label, "failed", r["error"][:120]
        return label, value(r), detail(r)

    rows = [
        row("generation (HFEngine)", "generation", lambda g: f"{g['tokens_per_s']:,.0f} tokens/s",
            lambda g: f"{g['prompts']} prompts × K={g['k']}, ≤{g['max_new_tokens']} new tokens, {g['seconds_per_call']} s/call; "
            f"in-place reload {g['in_place_reload_s']} s"),
        row("judge (PairRM)", "judge", lambda j: f"{j['pairs_per_s']:,.1f} pairs/s",
            lambda j: f"{j['prompts']} prompts × {j['k']}·{j['k'] - 1} pairs, ~{j['prompt_tokens']}+2×{j['response_tokens']} tokens"),
        row("learner step (SPPO)", "learner", lambda l: f"{l['step_s']:.3f} s/step",
            lambda l: f"{l['pairs_per_step']} pairs × 2 × {l['max_length']} tokens, {l['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {'n/a' if l['mfu'] is None else format(l['mfu'], '.1%')}"),
    ]
    width = max(len(r[0]) for r in rows)
    value = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>{value}}  {c}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="Component throughput on one GPU (no Ray/vLLM/DeepSpeed).")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/gpu_<device>.json)")
    parser.add_argument("--tiny", action="store_true", help="small sizes: check that the script works (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, help="generation prompts per call (default 32; tiny 2)")
    parser.add_argument("--max-new-tokens", type=int, help="generation length (default 256; tiny 8)")
    parser.add_argument("--pairs", type=int, help="learner pairs per step (default 8; tiny 2)")
    args = parser.parse_args()

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    on_gpu = device.type == "cuda"
    dtype = "bfloat16" if on_gpu else "float32"
    peak = peak_bf16_flops(name) if on_gpu else None
    tiny = args.tiny
    gen_sizes = dict(prompts=args.prompts or (2 if tiny else 32), prompt_chars=16 if tiny else 128,
                     max_new_tokens=args.max_new_tokens or (8 if tiny else 256), repeats=1 if tiny else 2)
    judge_sizes = dict(prompts=2 if tiny else 16, prompt_tokens=20 if tiny else 100,
                       response_tokens=30 if tiny else 300, repeats=1 if tiny else 2)
    learner_sizes = dict(pairs=args.pairs or (2 if tiny else 8), max_length=32 if tiny else None,
                         warmup=1 if tiny else 2, steps=2 if tiny else 5)
    started = time.perf_counter()
    print(f"device: {name}; peak bf16: {peak / 1e12 if peak else 'unknown'} TFLOP/s; tiny={tiny}", flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="spo_gpu_bench-") as tmp:
        tokenizer = policy_tokenizer((TINY_POLICY if tiny else POLICY)["vocab_size"])
        policy = build_policy(TINY_POLICY if tiny else POLICY, tokenizer, device)
        policy_dir = Path(tmp) / "policy"
        policy.to(torch.bfloat16 if on_gpu else torch.float32).save_pretrained(policy_dir)
        tokenizer.save_pretrained(policy_dir)
        # One stage failing (out of memory, say) must not cost the others' figures.
        results["generation"] = stage("generation", device, bench_generation, str(policy_dir), device, dtype, gen_sizes)
        results["judge"] = stage("judge", device, bench_judge, Path(tmp) / "pairrm", device, dtype,
                                 TINY_PAIRRM if tiny else PAIRRM, judge_sizes)
        policy = policy.float()  # fp32 master weights; the matmuls run in bf16 under autocast
        results["learner"] = stage("learner", device, bench_learner, policy, tokenizer, device, on_gpu, learner_sizes, peak)
        if "error" in results["learner"] and learner_sizes["pairs"] > 1:  # retry once at half the batch
            learner_sizes["pairs"] //= 2
            results["learner"] = stage("learner", device, bench_learner, policy, tokenizer, device, on_gpu, learner_sizes, peak)

    import transformers

    report = {
        "device": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tiny": tiny,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "transformers": transformers.__version__},
        "policy_shape": TINY_POLICY if tiny else POLICY,
        "results": results,
        "optional_modules_loaded": [m for m in NOT_HERE if m in sys.modules],  # by transformers integrations at most
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(table(results))
    out = args.out or REPO / "benchmarks" / "results" / f"gpu_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
