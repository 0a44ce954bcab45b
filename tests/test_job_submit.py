"""`ray job submit` end to end: a real `ray start --head`, the shipped cluster/runtime_env.yaml,
the tiny preset made short, then the job's status, artifacts and `ray job logs`.

Everything runs in subprocesses against a Ray head of its own (own ports, own temp dir), so the
test neither needs nor disturbs an in-process Ray (the session fixture): the job's driver finds
its cluster through RAY_ADDRESS, which the job supervisor sets. The head runs with `--block`
and is stopped through that process (SIGTERM), which shuts down exactly this head's
processes, not every Ray on the machine as `ray stop` would.

Auth: Ray 2.60's `ray start` turns token auth on by itself when ~/.ray/auth_token exists
(`maybe_enable_token_auth_if_token_available`), while `ray job submit` only sends a token when
RAY_AUTH_MODE=token. Both get RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN here, so they agree
whatever the machine's ~/.ray holds, and no token file is written.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

RAY = str(Path(sys.executable).with_name("ray"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Short but complete: one iteration on 8 prompts, 4 held-out prompts, short answers.
FAST = [
    "run.iterations=1",
    "learner.epochs=1",
    "data.prompts_per_iteration=8",
    "data.num_eval=4",
    "rollout.max_new_tokens=8",
    "evaluate.max_new_tokens=8",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # teardown: no drain wait (nothing is served)
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # The job's entrypoint runs `python` from PATH: this venv's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on free ports; yields (dashboard address, env)."""
    env = _env()
    gcs, dashboard, agent, agent_grpc, metrics, runtime_env, client, node_mgr, obj_mgr = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayjs-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log = open(Path(temp_dir) / "ray_start.log", "w")
    head = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
            "--port", str(gcs), "--temp-dir", temp_dir,
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(runtime_env),
            "--ray-client-server-port", str(client),
            "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, env, head, Path(temp_dir) / "ray_start.log")
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` shuts its own processes down
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(address: str, env: dict, head: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the dashboard at {address} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_job_submit_runs_sppo_to_completion(ray_head, tmp_path):
    address, env = ray_head
    run_dir = tmp_path / "run"
    submission_id = f"spo_ray_test_{secrets.token_hex(4)}"
    submit = _ray(
        [
            "job", "submit", "--address", address, "--submission-id", submission_id,
            "--runtime-env", "cluster/runtime_env.yaml", "--",
            "python", "-m", "spo_ray.train", "experiment=tiny", f"run.dir={run_dir}", *FAST,
        ],
        env, timeout=480,
    )  # fmt: skip
    status = _ray(["job", "status", "--address", address, submission_id], env, timeout=60)
    logs = _ray(["job", "logs", "--address", address, submission_id], env, timeout=60)
    context = f"submit rc={submit.returncode}\n{submit.stderr[-2000:]}\nstatus: {status.stdout}{status.stderr}\nlogs:\n{logs.stdout[-4000:]}"
    assert submit.returncode == 0, context
    assert re.search(rf"Job '{submission_id}' succeeded", ANSI.sub("", status.stdout)), context

    # The progress lines reach `ray job logs`: the driver's and the learner worker's.
    assert "[spo_ray] iteration 1/1: streaming 8 prompts" in logs.stdout, context
    assert "[learner] iter 1" in logs.stdout, context
    first_step = [line for line in logs.stdout.splitlines() if "[learner] iter 1 epoch 1/" in line and " step 1/" in line]
    assert len(first_step) == 1, first_step  # once, not teed by Ray Train's print patch too
    assert "[spo_ray] done: π_1" in logs.stdout, context
    # The driver joined the `ray start` cluster rather than starting a Ray of its own.
    assert "Started a local Ray instance" not in logs.stdout, context

    # Artifacts of a complete run (DESIGN.md §4).
    for name in ("config.yaml", "metrics.jsonl", "report.md", "iter_1/eval.json", "iter_0/answers.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "iter_1" / "pairs").glob("*.parquet"))
    evaluation = json.loads((run_dir / "iter_1" / "eval.json").read_text())
    assert 0.0 <= evaluation["win_rate"] <= 1.0 and evaluation["n"] == 4
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = run_dir / "iter_1" / "policy"
    assert AutoModelForCausalLM.from_pretrained(policy) is not None
    assert AutoTokenizer.from_pretrained(policy) is not None
