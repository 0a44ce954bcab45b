"""benchmarks/loss_comparison.py: a sweep's runs (one per loss) summarized as the paper's
table, from the runs' own iteration records."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks import loss_comparison


def _point(sweep, job: int, loss: str, rates: list[tuple[float, float]], *, held_out: int = 200) -> None:
    """A finished sweep point: its resolved config and one iteration record per (training, independent) win rate."""
    path = sweep / str(job)
    path.mkdir(parents=True)
    cfg = {
        "learner": {"loss": loss, "beta": 0.01, "lr": 5e-6},
        "data": {"prompts_per_iteration": 96, "num_eval": held_out},
        "judge": {"name": "reference"},
        "evaluate": {"judge": "reference_mpnet"},
        "run": {"seed": 0},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = [{"kind": "step", "iteration": 1, "loss": 1.0}]
    for t, (rate, independent) in enumerate(rates, start=1):
        records.append({
            "kind": "iteration", "iteration": t, "win_rate": rate, "win_rate_ci": [rate - 0.07, rate + 0.07],
            "independent_win_rate": independent, "independent_win_rate_ci": [independent - 0.07, independent + 0.07],
            "avg_length": 44.0 + t, "baseline_avg_length": 44.6, "wins": 80, "ties": 50, "losses": 70, "n": held_out,
        })
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_summary_holds_every_methods_iterations_as_its_runs_recorded_them(tmp_path):
    sweep = tmp_path / "sweep"
    _point(sweep, 0, "sppo", [(0.55, 0.56), (0.59, 0.60)])
    _point(sweep, 1, "dpo", [(0.52, 0.50), (0.48, 0.47)])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")  # the sweep dir's own files are not points
    out = tmp_path / "out"
    summary = loss_comparison.main([str(sweep), "--out", str(out)])

    assert set(summary["methods"]) == {"sppo", "dpo"}
    sppo = summary["methods"]["sppo"]
    assert [r["iteration"] for r in sppo] == [1, 2]
    assert set(loss_comparison.KEYS) <= set(sppo[0])
    assert sppo[1]["win_rate"] == 0.59 and sppo[1]["independent_win_rate_ci"] == pytest.approx([0.53, 0.67])
    assert json.loads((out / "summary.json").read_text())["methods"]["dpo"][1]["win_rate"] == 0.48
    rows = (out / "table.md").read_text().splitlines()
    # the paper's layout: π_0, then the baselines, SPPO last, one row per iteration
    assert [r.split("|")[1].strip() for r in rows[2:]] == [
        "π_0", "DPO (β = 0.01) iter 1", "DPO (β = 0.01) iter 2", "SPPO (β = 0.01) iter 1", "SPPO (β = 0.01) iter 2"
    ]
    assert "0.590 [0.520, 0.660]" in rows[-1] and rows[2].endswith("| 44.6 |")
    assert (out / "win_rate.png").stat().st_size > 1000


def test_points_that_differ_in_more_than_the_loss_are_refused(tmp_path):
    sweep = tmp_path / "sweep"
    _point(sweep, 0, "sppo", [(0.55, 0.56)])
    _point(sweep, 1, "dpo", [(0.52, 0.50)], held_out=100)
    with pytest.raises(ValueError, match=r"differ in \['held_out'\]"):
        loss_comparison.summarize(sweep)
    with pytest.raises(FileNotFoundError, match="no sweep point dirs"):
        loss_comparison.summarize(tmp_path)
