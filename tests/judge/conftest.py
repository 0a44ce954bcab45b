"""Fixtures for the judge tests: a tiny random PairRM in both published layouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pairrm_checkpoints, under any import mode

from pairrm_checkpoints import FIXTURES, build_random_pairrm  # noqa: E402


@pytest.fixture(scope="session")
def pairrm_parity() -> dict:
    """llm-blender 0.0.2's outputs on the seeded checkpoint (see fixtures/make_pairrm_parity.py)."""
    return json.loads((FIXTURES / "pairrm_parity.json").read_text())


@pytest.fixture(scope="session")
def tiny_pairrm(tmp_path_factory: pytest.TempPathFactory, pairrm_parity: dict) -> dict[str, object]:
    """backbone/, ranker/ and hf/ folders of the checkpoint the parity fixture was made with."""
    return build_random_pairrm(Path(tmp_path_factory.mktemp("pairrm")), seed=pairrm_parity["seed"])
