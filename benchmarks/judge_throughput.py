"""PairRM ranking throughput: spo_ray's PairRMJudge vs llm-blender 0.0.2's `Blender.rank`.

Both rank the same prompts (K responses each, all K(K−1) ordered pairs) with the same random
checkpoint in llm-blender/PairRM's layout, DeBERTa-v3-large-sized by default (hidden 1024,
24 layers, 16 heads, 256 position buckets; the tiny test tokenizer, so the vocabulary is
small, which changes nothing in the encoder's cost). llm-blender runs in its own venv (it
does not import on transformers 5) through a subprocess of this same file, at batch_size=1
(the SPPO paper's setting) and at each `--blender-batch-sizes`; ours runs length-bucketed,
dynamically padded, under `--token-budget` tokens per forward pass. Model loading and a
warm-up (one prompt, two responses) are not timed. Results agree: the script reports the
largest difference between our scores and llm-blender's batch_size=1 scores.

On 2 shared vCPUs one DeBERTa-large pair takes ~10 s, so the committed runs are small:

    python3 -m venv /tmp/blender-venv   # see tests/judge/fixtures/make_pairrm_parity.py
    python benchmarks/judge_throughput.py --prompts 1 --blender-batch-sizes 1 \
        --out benchmarks/results/judge_throughput_cpu.json
    python benchmarks/judge_throughput.py --layers 6 --prompts 2 --blender-batch-sizes 1,2 \
        --out benchmarks/results/judge_throughput_cpu_6layers.json
    python benchmarks/judge_throughput.py --layers 4 --hidden 256 --heads 4   # a quick, small run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a of to and in is it that for on with as was by this be are or at from have an they which one you "
    "were her all she there would their we him been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another know while last "
    "answer step summary model prompt response reason example code function value list table result."
).split()


def make_workload(tokenizer, prompts: int, k: int, prompt_tokens: int, response_tokens: int, seed: int):
    """Random word texts whose token counts are within ±25% of the targets."""
    rng = random.Random(seed)

    def text(target: int) -> str:
        goal = rng.randint(int(target * 0.75), int(target * 1.25))
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < goal:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    inputs = [text(prompt_tokens) for _ in range(prompts + 1)]
    candidates = [[text(response_tokens) for _ in range(k)] for _ in range(prompts + 1)]
    return inputs, candidates  # the first prompt is the warm-up


def run_blender_worker(args: argparse.Namespace) -> None:
    """Runs inside llm-blender's venv: load, warm up, time `Blender.rank`, print JSON."""
    import llm_blender
    import torch
    import transformers

    data = json.loads(Path(args.data).read_text())
    blender = llm_blender.Blender()
    blender.loadranker(args.ckpt, device="cpu")
    inputs, candidates = data["inputs"], data["candidates"]
    blender.rank(inputs[:1], [candidates[0][:2]], return_scores=True, batch_size=1, disable_tqdm=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    scores = blender.rank(inputs[1:], candidates[1:], return_scores=True, batch_size=args.batch_size, disable_tqdm=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "scores": scores.tolist(), "threads": torch.get_num_threads(),
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                      "load_average": [load, os.getloadavg()[0]]}))


def machine() -> dict:
    import torch
    import transformers

    from benchmarks.machine import cpu_model

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "note": "vCPUs shared with other jobs: each result carries the 1-min load average before and after it",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--position-buckets", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=4, help="timed prompts (one more is the warm-up)")
    parser.add_argument("--k", type=int, default=5, help="responses per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--response-tokens", type=int, default=300)
    parser.add_argument("--token-budget", type=int, default=4096, help="ours: tokens per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--blender-python", default="/tmp/blender-venv/bin/python")
    parser.add_argument("--blender-batch-sizes", default="1,2,4", help="comma-separated; 1 is always run")
    parser.add_argument("--skip-blender", action="store_true")
    parser.add_argument("--workdir", type=Path, help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["blender"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "blender":
        run_blender_worker(args)
        return

    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests" / "judge"))
    from pairrm_checkpoints import build_random_pairrm

    from spo_ray.judge.pairrm import PairRMJudge

    size = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "position_buckets": args.position_buckets}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        if not (root / "ranker" / "model.safetensors").exists():
            print(f"building a random PairRM {size} in {root} ...", flush=True)
            build_random_pairrm(root, seed=args.seed, with_hf=False, **size)
        tokenizer = AutoTokenizer.from_pretrained(root / "backbone")
        inputs, candidates = make_workload(tokenizer, args.prompts, args.k, args.prompt_tokens, args.response_tokens, args.seed)
        lengths = {
            "prompt_tokens": [len(tokenizer(t)["input_ids"]) for t in inputs[1:]],
            "response_tokens": [[len(tokenizer(t)["input_ids"]) for t in c] for c in candidates[1:]],
        }
        pairs = args.prompts * args.k * (args.k - 1)
        rows = []

        judge = PairRMJudge.from_pretrained(root / "ranker", device=args.device, dtype=args.dtype, token_budget=args.token_budget)
        judge.batch_pairwise_logits(inputs[:1], [candidates[0][:2]])
        if judge.device.type == "cuda":
            torch.cuda.synchronize()
        load = os.getloadavg()[0]
        start = time.perf_counter()
        ours = judge.batch_pairwise_logits(inputs[1:], candidates[1:])
        seconds = time.perf_counter() - start
        our_scores = torch.stack([(m - m.T).mean(-1) for m in ours])
        rows.append({"name": f"spo_ray PairRMJudge ({args.device}, {args.dtype}, token_budget={args.token_budget})",
                     "seconds": seconds, "pairs_per_s": pairs / seconds, "load_average": [load, os.getloadavg()[0]]})
        print(f"{rows[-1]['name']}: {seconds:.1f} s", flush=True)
        del judge

        blender_rows = []
        if not args.skip_blender:
            data = root / "workload.json"
            data.write_text(json.dumps({"inputs": inputs, "candidates": candidates}))
            sizes = sorted({1, *(int(b) for b in args.blender_batch_sizes.split(",") if b)})
            for batch_size in sizes:
                if batch_size > args.prompts:
                    continue
                cmd = [args.blender_python, __file__, "--worker", "blender", "--ckpt", str(root / "ranker"),
                       "--data", str(data), "--batch-size", str(batch_size)]
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if done.returncode != 0:
                    raise RuntimeError(f"llm-blender worker failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                diff = (our_scores - torch.tensor(result["scores"])).abs().max().item()
                blender_rows.append({"name": f"llm-blender Blender.rank (cpu, float32, batch_size={batch_size})",
                                     "batch_size": batch_size, "seconds": result["seconds"],
                                     "pairs_per_s": pairs / result["seconds"], "max_score_diff_vs_ours": diff,
                                     "load_average": result["load_average"], "versions": result["versions"]})
                print(f"{blender_rows[-1]['name']}: {result['seconds']:.1f} s (max |score diff| {diff:.2e})", flush=True)
        rows += blender_rows

    best = max(blender_rows, key=lambda r: r["pairs_per_s"]) if blender_rows else None
    bs1 = next((r for r in blender_rows if r["batch_size"] == 1), None)
    ratios = {}
    if best:
        ratios = {"ours_vs_blender_batch_size_1": rows[0]["pairs_per_s"] / bs1["pairs_per_s"],
                  "ours_vs_blender_best": rows[0]["pairs_per_s"] / best["pairs_per_s"],
                  "blender_best_batch_size": best["batch_size"]}
    print(f"\n{'ranker':<70} {'seconds':>9} {'pairs/s':>9} {'ours ×':>7}")
    for r in rows:
        print(f"{r['name']:<70} {r['seconds']:>9.1f} {r['pairs_per_s']:>9.3f} {rows[0]['pairs_per_s'] / r['pairs_per_s']:>7.2f}")
    if ratios:
        print(f"ours vs llm-blender: {ratios['ours_vs_blender_batch_size_1']:.2f}× at batch_size=1, "
              f"{ratios['ours_vs_blender_best']:.2f}× at its best (batch_size={best['batch_size']})")
    report = {
        "benchmark": "judge_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": dict(size, intermediate=4 * args.hidden, note="random weights, DeBERTa-v3 layout, tiny vocabulary"),
        "workload": {"prompts": args.prompts, "k": args.k, "ordered_pairs": pairs, **lengths},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "ckpt", "data", "batch_size")},
        "results": rows,
        "ratios": ratios,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
