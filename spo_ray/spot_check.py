"""Spot checks: a few held-out prompts answered by the served policy, or by checkpoints
side by side (π_0 vs π_t), printed as a markdown table.

    python -m spo_ray.spot_check --url http://127.0.0.1:8000 --prompts 5
    python -m spo_ray.spot_check --url http://127.0.0.1:8000 --run-dir runs/<run>
    python -m spo_ray.spot_check --checkpoints runs/<run>/iter_0/policy runs/<run>/iter_2/policy
    python -m spo_ray.spot_check --run-dir runs/<run>      # π_0 vs the latest π_t, loaded here

Prompts come from the run's held-out split (`--run-dir`: split.json plus the data source
named in its config.yaml), from `--prompt` (repeatable), or from a short built-in list.
Checkpoints are loaded here one after the other (no Ray, no Serve), with the same
templating and sampling code as the server. Answers are greedy unless `--temperature` > 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

# Generic questions for a run without a held-out split at hand.
BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a hash table is in two sentences.",
    "Give three tips for a job interview.",
    "What is 17 * 23?",
    "Describe the sea.",
]


# ---------------------------------------------------------------------------- prompts
def held_out_prompts(run_dir: str, n: int) -> list[str]:
    """The first n held-out prompts of a run (never trained on)."""
    from omegaconf import OmegaConf

    from spo_ray.data.prompts import load_prompts
    from spo_ray.run_dir import RunFiles

    files = RunFiles(Path(run_dir))
    for path in (files.config, files.split):
        if not path.is_file():
            raise FileNotFoundError(f"--run-dir {run_dir!r} has no {path.name}: give the run.dir of a training run")
    data = OmegaConf.load(files.config).data
    rows = {r["prompt_id"]: r for r in load_prompts(data.source, data.format, data.prompt_field, data.get("id_field")).rows}
    ids = json.loads(files.split.read_text())["held_out"][:n]
    missing = [i for i in ids if i not in rows]
    if missing:
        raise ValueError(f"{files.split} names held-out prompts that data.source={data.source!r} no longer has (e.g. {missing[0]})")
    return [rows[i]["prompt"] for i in ids]


def latest_policies(run_dir: str) -> list[str]:
    """π_0 and the latest finished π_t of a run."""
    from spo_ray.run_dir import IterationFiles, iteration_dir
    from spo_ray.serve import resolve_checkpoint

    first = IterationFiles(iteration_dir(run_dir, 0)).policy
    last, _ = resolve_checkpoint(run_dir)
    return [str(first)] if Path(last) == first.resolve() else [str(first), last]


# ---------------------------------------------------------------------------- answers
def _http_json(url: str, api_key: Optional[str], body: Optional[dict], timeout: float) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        message = json.load(err)["error"]["message"]
    except Exception:
        message = err.reason
    return f"[HTTP {err.code}: {message}]"


def ask_server(url: str, prompts: Sequence[str], *, api_key: Optional[str], max_tokens: Optional[int], temperature: float, seed: int, timeout: float) -> tuple[str, list[str]]:
    """A column label (model and iteration it serves) and one answer per prompt."""
    base = url.rstrip("/").removesuffix("/v1")
    try:
        card = _http_json(f"{base}/v1/models", api_key, None, timeout)["data"][0]
    except urllib.error.HTTPError as err:
        raise ConnectionError(f"{base}/v1/models answered {_error_text(err)}") from None
    except urllib.error.URLError as err:
        raise ConnectionError(f"no server answers at {base} ({err.reason}); start one with `python -m spo_ray.serve checkpoint=...`") from None
    answers = []
    for prompt in prompts:
        body = {"model": card["id"], "messages": [{"role": "user", "content": prompt}], "temperature": temperature, "seed": seed}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        try:
            answers.append(_http_json(f"{base}/v1/chat/completions", api_key, body, timeout)["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as err:
            answers.append(_error_text(err))
    iteration = card.get("iteration")
    return f"{card['id']}{'' if iteration is None else f' π_{iteration}'} ({base})", answers


def ask_checkpoint(path: str, prompts: Sequence[str], *, dtype: str, max_tokens: int, temperature: float, seed: int) -> tuple[str, list[str]]:
    """A column label (π_t) and one answer per prompt from a checkpoint loaded here."""
    from spo_ray.serve import PromptError, complete_chat, load_engine, resolve_checkpoint

    folder, iteration = resolve_checkpoint(path)
    engine = load_engine(folder, dtype)
    answers = []
    for prompt in prompts:
        try:
            completion = complete_chat(
                engine.model, engine.tokenizer, [{"role": "user", "content": prompt}],
                max_tokens=max_tokens, temperature=temperature, top_p=1.0, n=1, seed=seed,
            )
            answers.append(completion.texts[0])
        except PromptError as err:
            answers.append(f"[{err}]")
    label = f"π_{iteration}" if iteration is not None else Path(folder).name
    return f"{label} ({path})", answers


# ---------------------------------------------------------------------------- table
def _cell(text: str, width: int) -> str:
    text = text.replace("|", "\\|").replace("\r", "").replace("\t", " ").replace("\n", " ↵ ")
    return text if not width or len(text) <= width else text[: width - 1] + "…"


def markdown_table(prompts: Sequence[str], columns: Sequence[tuple[str, list[str]]], width: int) -> str:
    """One row per prompt, one column per policy; cells cut to `width` characters (0: whole)."""
    header = ["#", "prompt", *(label for label, _ in columns)]
    lines = ["| " + " | ".join(_cell(h, 0) for h in header) + " |", "|" + "---|" * len(header)]
    for i, prompt in enumerate(prompts):
        cells = [str(i + 1), _cell(prompt, width), *(_cell(answers[i], width) for _, answers in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spo_ray.spot_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", action="append", default=[], help="a running spo_ray.serve deployment (repeatable)")
    p.add_argument("--checkpoints", nargs="+", default=[], metavar="PATH", help="policy folders (or run dirs) to load here and compare")
    p.add_argument("--run-dir", help="take held-out prompts from this run; alone, compare its π_0 with its latest π_t")
    p.add_argument("--prompts", type=int, default=5, metavar="N", help="how many prompts (default 5)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt of your own (repeatable; replaces the others)")
    p.add_argument("--api-key", default=os.environ.get("SPO_RAY_API_KEY"), help="bearer token of the deployment (default: $SPO_RAY_API_KEY)")
    p.add_argument("--max-tokens", type=int, help="default: serve.default_max_tokens from conf/serve/default.yaml")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy answers, comparable across policies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="weights of locally loaded checkpoints")
    p.add_argument("--width", type=int, default=120, help="characters per cell, 0 for whole answers (default 120)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP request")
    args = p.parse_args(argv)
    if args.prompts < 1:
        p.error(f"--prompts must be ≥ 1, got {args.prompts}")
    if not (args.url or args.checkpoints or args.run_dir):
        p.error("nothing to ask: give --url, --checkpoints or --run-dir")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.prompt:
            prompts = args.prompt
        elif args.run_dir:
            prompts = held_out_prompts(args.run_dir, args.prompts)
        else:
            prompts = BUILTIN_PROMPTS[: args.prompts]
        checkpoints = args.checkpoints or ([] if args.url else latest_policies(args.run_dir))
        if args.max_tokens is None and checkpoints:
            from spo_ray.serve import load_serve_config

            local_max_tokens = load_serve_config().default_max_tokens
        else:
            local_max_tokens = args.max_tokens
        columns = [
            ask_server(url, prompts, api_key=args.api_key, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, timeout=args.timeout)
            for url in args.url
        ]
        columns += [
            ask_checkpoint(path, prompts, dtype=args.dtype, max_tokens=local_max_tokens, temperature=args.temperature, seed=args.seed)
            for path in checkpoints
        ]
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"spo_ray.spot_check: {err}") from None
    print(markdown_table(prompts, columns, args.width))


if __name__ == "__main__":
    main()
