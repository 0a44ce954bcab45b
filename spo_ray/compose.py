"""From Hydra's composed config to the typed `Config` (spo_ray/config.py): the schema registered
in Hydra's ConfigStore, so `conf/config.yaml` extends it, and `validate`, which rejects keys
the schema does not declare and runs every `__post_init__` check — before Ray starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from spo_ray.config import Config, JudgeConfig
from spo_ray.sections import freeze

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can extend it (`defaults: [schema, ...]`)."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


def _unknown_keys(node: DictConfig, path: str = "") -> list[str]:
    """Keys a typed section does not declare: `+learner.lrr=1` gets past Hydra's struct check."""
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    unknown = []
    for key in node.keys():
        if declared is not None and key not in declared:
            unknown.append(f"{path}{key}")
        elif OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue  # nothing below it yet; an interpolation is not resolved here
        elif OmegaConf.is_dict(child := node[key]):  # a section set to null reads as None
            unknown.extend(_unknown_keys(child, f"{path}{key}."))
    return unknown


def validate(cfg: DictConfig) -> Config:
    """Turn a composed config into dataclasses, running every `__post_init__` check; the
    result is read-only (`spo_ray.sections.freeze`)."""
    unknown = _unknown_keys(cfg)
    if unknown:
        raise ValueError(f"invalid configuration: unknown key(s) {', '.join(unknown)}: not in the schema (spo_ray/config.py)")
    try:
        config = OmegaConf.to_object(cfg)
    except Exception as err:  # OmegaConf wraps errors from __post_init__
        cause = err.__cause__ or err
        raise ValueError(f"invalid configuration: {cause}") from None
    if config.evaluate.judge is not None:  # type: ignore[attr-defined]
        judge_preset(config.evaluate.judge)  # type: ignore[attr-defined]  # the independent judge's preset exists and is valid
    return freeze(config)  # type: ignore[arg-type, return-value]


def judge_preset(name: str) -> JudgeConfig:
    """The judge section of `conf/judge/<name>.yaml`, typed, checked and read-only, for a
    second judge named by `evaluate.judge` (or `python -m spo_ray.tournament --judge`)."""
    path = CONF_DIR / "judge" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ValueError(f"invalid configuration: evaluate.judge={name!r} names no preset in {path.parent} (known: {known})")
    try:
        judge = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JudgeConfig), OmegaConf.load(path)))
    except Exception as err:
        raise ValueError(f"invalid configuration: judge preset {path}: {err.__cause__ or err}") from None
    return freeze(judge)  # type: ignore[arg-type, return-value]
