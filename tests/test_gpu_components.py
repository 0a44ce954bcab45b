"""benchmarks/gpu_components.py, the script a lent GPU machine runs (no Hydra, Ray or
DeepSpeed there), at its --tiny sizes on CPU: every stage runs, and the settings it reads
from conf/ by hand are the ones Hydra composes. It reads the YAML files itself, so a
refactor of conf/ that it does not follow fails here, not on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, compose


def test_every_stage_runs_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_components.py"), "--tiny", "--out", str(out)],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"generation", "judge", "learner"}
    for stage, figures in results.items():
        assert "error" not in figures, (stage, figures.get("error"))
    assert results["generation"]["tokens_per_s"] > 0 and results["judge"]["pairs_per_s"] > 0
    assert results["learner"]["step_s"] > 0 and results["learner"]["shared_prompt"] is True


def test_the_settings_it_reads_by_hand_are_what_hydra_composes():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_components
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    _, cfg = compose(["experiment=mistral7b_sppo"])
    rollout = gpu_components.group("rollout", "vllm")
    assert (rollout["num_samples"], rollout["temperature"], rollout["top_p"]) == (cfg.rollout.num_samples, cfg.rollout.temperature, cfg.rollout.top_p)
    learner = {**gpu_components.group("learner", "sppo"), **gpu_components.conf("experiment", "mistral7b_sppo.yaml")["learner"]}
    for key in ("max_length", "max_prompt_length", "beta", "shared_prompt", "micro_batch_size"):
        assert learner[key] == getattr(cfg.learner, key), key
