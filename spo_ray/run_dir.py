"""The run directory (DESIGN.md §4) and its manifest of finished stages.

    run_dir/
      config.yaml  manifest.json  metrics.jsonl  split.json  report.md  win_rate.png
      logratios.png  tournament.png  iterations.json  (report.py)
      iter_0/policy/            π_0 as an HF folder; iter_0/answers.json (baseline answers)
      iter_<t>/pairs/*.parquet  the iteration's pair rows;  iter_<t>/skipped/*.parquet
      iter_<t>/policy/          π_t;  iter_<t>/eval.json;  iter_<t>/answers.json
      iter_<t>/tournament.json  every pair of π_0 … π_t judged on the held-out prompts (tournament.py)
      iter_<t>/train_metrics.jsonl  iter_<t>/learner_summary.json
      iter_<t>/timeline.json    where the iteration's time went (spo_ray/timeline.py), merged from
                                iter_<t>/timeline_parts/*.jsonl, one file per recording process
      iter_<t>/model_outputs.json  iter_<t>/mt_bench_answers.jsonl  (answer files, evaluate.py)
      iter_<t>/checkpoints/step_<n>/  the learner's last step checkpoint (DeepSpeed + position.json),
                                      removed once the `train` stage is done

A stage counts as finished only once `manifest.json` says so; the manifest is replaced
atomically (write-then-rename) after the stage's files are complete, so a crash never
leaves a half-written stage that looks finished. The same holds inside the `train` stage:
pair parts and step checkpoints are written under a temporary name and renamed when
complete (spo_ray/learner/resume.py), so an unfinished `train` stage resumes from what it
left — its persisted pairs are not generated again, its last checkpoint is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def write_then_rename(path: Path) -> Iterator[Path]:
    """Write-then-rename: yields a fresh temporary sibling of `path` to write; when the block
    ends it replaces `path` in one rename, so a reader (or a run killed mid-write) sees the old
    file or the new one, never half of one. Two writers never share a temporary; on an error
    the temporary is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes the file private; run files are for other tools and users
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def write_folder_then_rename(path: Path, *, replace: bool = True) -> Iterator[Path]:
    """`write_then_rename` for a folder: yields a fresh, empty temporary sibling of `path` to
    fill; when the block ends the temporary becomes `path` in one rename, so a reader never
    sees a half-written folder. `replace=True` removes an existing `path` first; with
    `replace=False` the rename fails (OSError) when another writer has already put a non-empty
    `path` there, and that folder is kept. On any error the temporary is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes the folder private; policies and caches are shared
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)` through `write_then_rename`."""
    with write_then_rename(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def read_json_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file ([] when it does not exist). A last line that does not
    parse was cut short by a crash mid-append (its writer runs again on resume) and is dropped;
    a bad line anywhere else raises."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and not _is_json(lines[-1]):
        lines.pop()
    return [json.loads(line) for line in lines]


def _end_torn_line(path: Path) -> None:
    """Before appending: a last line without its newline (a crash mid-append) is ended when it
    parses and dropped when it does not, so the next record starts a line of its own."""
    if not path.exists():
        return
    with path.open("r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        text = f.read()
        start = text.rfind(b"\n") + 1
        if _is_json(text[start:]):
            f.write(b"\n")
        else:
            f.truncate(start)


def _is_json(line: str | bytes) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


_ITER_DIR = re.compile(r"iter_(\d+)")


def iteration_dir(run_path: str | Path, t: int) -> Path:
    """`iter_<t>/` of a run directory (nothing is created, unlike `RunDir`)."""
    return Path(run_path) / f"iter_{t}"


def iteration_of(folder: str | Path) -> int | None:
    """t of a folder named `iter_<t>`; None for any other name."""
    match = _ITER_DIR.fullmatch(Path(folder).name)
    return int(match.group(1)) if match else None


def finished_policies(run_path: str | Path) -> list[tuple[int, Path]]:
    """(t, `iter_<t>/policy`) of every iteration whose policy folder is complete (has its
    config.json), by t."""
    found = ((iteration_of(d), d / "policy") for d in Path(run_path).glob("iter_*"))
    return sorted((t, policy) for t, policy in found if t is not None and (policy / "config.json").is_file())


@dataclass(frozen=True)
class IterationFiles:
    """The files of one `iter_<t>/` folder (the layout above), for code that knows the folder
    but not the RunDir (learner workers, stage actors)."""

    dir: Path

    @property
    def policy(self) -> Path:
        return self.dir / "policy"

    @property
    def pairs(self) -> Path:
        return self.dir / "pairs"

    @property
    def skipped(self) -> Path:
        return self.dir / "skipped"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def train_metrics(self) -> Path:
        return self.dir / "train_metrics.jsonl"

    @property
    def learner_summary(self) -> Path:
        return self.dir / "learner_summary.json"

    @property
    def weight_push(self) -> Path:
        return self.dir / "weight_push.json"

    @property
    def weight_sync(self) -> Path:
        return self.dir / "weight_sync.json"

    @property
    def answers(self) -> Path:
        return self.dir / "answers.json"

    @property
    def evaluation(self) -> Path:
        return self.dir / "eval.json"

    @property
    def tournament(self) -> Path:
        return self.dir / "tournament.json"

    @property
    def timeline(self) -> Path:
        return self.dir / "timeline.json"

    @property
    def timeline_parts(self) -> Path:
        return self.dir / "timeline_parts"


@dataclass(frozen=True)
class RunFiles:
    """The run-level files of a run directory (the layout above), for code that knows the folder
    but holds no RunDir (a RunDir creates its folder; this only names paths)."""

    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def split(self) -> Path:
        return self.dir / "split.json"


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.files = RunFiles(self.path)
        self.manifest_path = self.files.manifest
        self.split_path = self.files.split

    def iter_dir(self, t: int) -> Path:
        return iteration_dir(self.path, t)

    def iteration(self, t: int) -> IterationFiles:
        return IterationFiles(self.iter_dir(t))

    def policy(self, t: int) -> Path:
        return self.iteration(t).policy

    def timeline(self, t: int) -> Path:
        return self.iteration(t).timeline

    def timeline_parts(self, t: int) -> Path:
        return self.iteration(t).timeline_parts

    # -- manifest --------------------------------------------------------------------
    def manifest(self) -> dict[str, list[str]]:
        if not self.manifest_path.exists():
            return {}
        return json.loads(self.manifest_path.read_text())

    def done(self, t: int, stage: str) -> bool:
        return stage in self.manifest().get(self.iter_dir(t).name, [])

    def mark_done(self, t: int, stage: str) -> None:
        manifest = self.manifest()
        manifest.setdefault(self.iter_dir(t).name, []).append(stage)
        write_json_atomic(self.manifest_path, manifest)

    def prepare_train(self, t: int) -> None:
        """Before an unfinished `train` stage (re)starts: drop its outputs that only a finished
        stage writes (π_t, the summary) and half-written temporaries; keep the persisted pairs,
        skipped prompts, step checkpoints and step metrics it resumes from."""
        # The timeline's parts too: the restarted stage's timeline is this attempt's.
        files = self.iteration(t)
        for target in (files.policy, files.learner_summary, files.timeline_parts):
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        # What a killed writer left half-written (write_then_rename's temporaries): files and folders.
        for leftover in (p for folder in (files.dir, files.checkpoints, files.pairs, files.skipped) for p in folder.glob(".tmp-*")):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    # -- files: `relative` is a path inside the run dir, or one that its methods return --
    def write_json(self, relative: str | Path, data: Any) -> Path:
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
        return path

    def read_json(self, relative: str | Path) -> Any:
        return json.loads((self.path / relative).read_text())

    def append_metrics(self, record: dict) -> None:
        path = self.files.metrics
        _end_torn_line(path)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read_jsonl(self, relative: str | Path) -> list[dict]:
        """The records of a JSON-lines file in the run dir (`read_json_lines`)."""
        return read_json_lines(self.path / relative)

    def metrics(self) -> list[dict]:
        return read_json_lines(self.files.metrics)


def timeline_parts(iter_dir: str | Path) -> Path:
    """Where an iteration's processes record their busy intervals (spo_ray/timeline.py): for
    code that knows the iteration's folder but not the RunDir (stage actors, learner workers)."""
    return IterationFiles(Path(iter_dir)).timeline_parts


def persisted_prompt_ids(iter_dir: str | Path) -> set[str]:
    """Prompts of an iteration whose row is already persisted, as a pair or a counted skip
    (only complete parts: a part is renamed into place once written)."""
    import pyarrow.parquet as pq

    files = IterationFiles(Path(iter_dir))
    ids: set[str] = set()
    for folder in (files.pairs, files.skipped):
        for part in sorted(folder.glob("part-*.parquet")):
            ids.update(pq.read_table(part, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return ids
