"""Read-only configuration sections: the base of every dataclass in spo_ray/config.py and
spo_ray/placement.py, and the checks their `__post_init__` share."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from typing import Any


class Section:
    """Base of every config dataclass: read-only once `spo_ray.compose.validate` has checked
    the whole configuration (`freeze`), so no stage can change what the run recorded in
    config.yaml. Not `@dataclass(frozen=True)`: OmegaConf makes the nodes of a frozen
    dataclass read-only, and Hydra could then apply no override. A changed copy:
    `dataclasses.replace(section, field=value)`."""

    _frozen = False

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise FrozenInstanceError(
                f"cannot assign {type(self).__name__}.{name}: the configuration is read-only once validated "
                "(use dataclasses.replace for a changed copy)"
            )
        super().__setattr__(name, value)


def freeze(section: Section) -> Section:
    """`section` and every section inside it made read-only; returns it."""
    for f in fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if isinstance(value, Section):
            freeze(value)
    object.__setattr__(section, "_frozen", True)
    return section


def one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


def positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
