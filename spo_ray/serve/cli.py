"""`python -m spo_ray.serve checkpoint=PATH [key=value ...]`: serve a finished checkpoint
(a policy folder, or a run directory's latest) until Ctrl-C."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from spo_ray.config import ServeConfig
from spo_ray.serve.controller import ServeError, serve_policy, stop_serving

CONF_FILE = Path(__file__).resolve().parents[2] / "conf" / "serve" / "default.yaml"


def load_serve_config(overrides: Sequence[str] = ()) -> ServeConfig:
    """conf/serve/default.yaml with `key=value` overrides (`port=8001` or
    `serve.port=8001`), typed and validated by `ServeConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    dotlist = [o.removeprefix("serve.") for o in overrides]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ServeConfig), OmegaConf.load(CONF_FILE), OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"invalid serve setting{f' {key}' if key else ''}: {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise ValueError(f"invalid serve setting: {err}") from None


def resolve_checkpoint(path: str) -> tuple[str, Optional[int]]:
    """A policy folder and its iteration (from `iter_<t>/policy`; None when the path does
    not say). A run directory resolves to its latest finished policy."""
    from spo_ray.run_dir import finished_policies, iteration_of

    p = Path(path)
    if (p / "config.json").is_file():
        return str(p.resolve()), iteration_of(p.parent) if p.name == "policy" else None
    policies = finished_policies(p)
    if policies:
        t, folder = policies[-1]
        return str(folder.resolve()), t
    if not p.exists():
        raise FileNotFoundError(f"checkpoint={path!r} does not exist: give a policy folder (runs/<run>/iter_<t>/policy) or a run directory")
    raise FileNotFoundError(f"checkpoint={path!r} has no config.json and no iter_<t>/policy folders: it is not a Hugging Face policy folder or a run directory")


USAGE = """usage: python -m spo_ray.serve checkpoint=PATH [iteration=T] [key=value ...]

Serves PATH (an HF policy folder, or a run directory: its latest iter_<t>/policy) with
Ray Serve until Ctrl-C. key=value overrides conf/serve/default.yaml, e.g. port=8001
host=0.0.0.0 api_key=secret max_tokens_limit=1024 dtype=bfloat16 num_gpus=1."""


def parse_cli(argv: Sequence[str]) -> tuple[ServeConfig, str, Optional[int]]:
    checkpoint, iteration, overrides = None, None, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"{arg!r}: expected key=value\n{USAGE}")
        if key in ("checkpoint", "+checkpoint"):
            checkpoint = value
        elif key in ("iteration", "+iteration"):
            iteration = int(value)
        else:
            overrides.append(arg)
    if checkpoint is None:
        raise ValueError(f"checkpoint=PATH is required\n{USAGE}")
    cfg = load_serve_config(overrides)
    path, inferred = resolve_checkpoint(checkpoint)
    return cfg, path, inferred if iteration is None else iteration


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    import signal

    import ray

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    try:
        cfg, checkpoint, iteration = parse_cli(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"spo_ray.serve: {err}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C and `kill` both end in the clean-up below (also when started in the background).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:  # join the cluster this runs in; start a local one only when there is none
        ray.init(address="auto")
    except ConnectionError:
        ray.init(address="local")
    failure = None
    try:
        info = serve_policy(cfg, checkpoint, iteration)
        if info["error"]:
            raise ServeError(info["error"])
        which = f"π_{info['iteration']}" if info["iteration"] is not None else "the checkpoint"
        print(
            f"[spo_ray] serving {cfg.name} = {which} ({info['checkpoint']})\n"
            f"[spo_ray] OpenAI base URL: {info['url']}/v1   health: {info['url']}/healthz   "
            f"auth: {'bearer token' if cfg.api_key else 'none'}   Ctrl-C stops it",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[spo_ray] stopping", flush=True)
    except ServeError as err:
        failure = err
    finally:
        try:
            stop_serving(cfg.name)
        finally:
            ray.shutdown()
    if failure is not None:
        raise SystemExit(f"spo_ray.serve: {failure}")
