"""Every shipped preset composes, validates and places its stages on its cluster's GPUs; the
paper presets hold the paper's values; every YAML field in conf/ is commented; typos and wrong
types fail while composing, naming the key; the cluster files agree with the presets.

All of it is composition only: nothing here starts Ray or downloads a model.
"""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tests.conftest import REPO, compose

CONF = REPO / "conf"
CLUSTER_DIR = REPO / "cluster"
PAPER = ("mistral7b_sppo", "llama3_8b_sppo", "mistral7b_dpo", "mistral7b_ipo")
GPU_CLUSTERS = ("a100x8", "a100x8x4")
# The tiny preset as a cluster smoke test: its micro batch (4) × the learner workers.
TINY_ON_GPUS = {"a100x8": ["learner.global_batch_size=16"], "a100x8x4": ["learner.global_batch_size=32"]}
# Every meaningful (experiment, cluster) pair and the overrides it needs.
SMOLLM2 = ("smollm2_demo", "smollm2_sppo")
PAIRS = (
    [("tiny", "local", [])]
    + [(e, "local", []) for e in SMOLLM2]
    + [("tiny", c, TINY_ON_GPUS[c]) for c in GPU_CLUSTERS]
    + [(e, c, []) for e in PAPER for c in GPU_CLUSTERS]
)


def _names(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def test_the_pairs_below_cover_every_shipped_preset():
    assert _names("experiment") == {"tiny", *SMOLLM2, *PAPER}, "a new conf/experiment preset: add it to PAIRS"
    assert _names("cluster") == {"local", *GPU_CLUSTERS}, "a new conf/cluster preset: add it to PAIRS"


@pytest.mark.parametrize("experiment, cluster, overrides", PAIRS, ids=[f"{e}-{c}" for e, c, _ in PAIRS])
def test_preset_composes_validates_and_fills_the_cluster(experiment, cluster, overrides):
    raw, cfg = compose([f"experiment={experiment}", f"cluster={cluster}", *overrides])
    c = cfg.cluster
    assert cfg.experiment == experiment
    # Placement adds up: while an iteration streams, rollout + judge + learner use every GPU.
    layout = c.gpu_layout()
    assert sum(layout.values()) == c.nodes * c.gpus_per_node, c.describe()
    assert c.evaluate.num_actors * c.evaluate.num_gpus <= c.nodes * c.gpus_per_node
    assert cfg.learner.global_batch_size % (cfg.learner.micro_batch_size * c.learner.num_workers) == 0
    if c.gpus_per_node:
        assert all(layout[stage] > 0 for stage in ("rollout", "judge", "learner")), c.describe()
        assert c.learner.gpus_per_worker == 1 and not c.colocate
        assert c.storage.startswith("/") and cfg.run.dir.startswith(c.storage + "/")
    if cfg.rollout.engine == "vllm" and c.gpus_per_node:  # one engine (tensor_parallel_size 1) per GPU
        assert cfg.rollout.tensor_parallel_size == 1 and c.rollout.num_gpus == 1
    elif cfg.rollout.engine == "vllm":  # vLLM's CPU build: its KV cache sized in GiB, not as a share of the RAM
        assert c.rollout.num_gpus == 0 and cfg.rollout.kv_cache_gb
    assert "???" not in OmegaConf.to_yaml(raw, resolve=True)  # what run_sppo saves as config.yaml


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_presets_refuse_a_machine_without_gpus(experiment):
    """Their vLLM engines are sized for GPUs; on CPUs the KV cache needs its size in GiB."""
    with pytest.raises(ValueError, match=r"rollout.engine=vllm on CPUs .* needs rollout.kv_cache_gb.*rollout=vllm_cpu"):
        compose([f"experiment={experiment}", "cluster=local"])


def test_vllm_cpu_rollout_composes_on_this_machine():
    _, cfg = compose(["experiment=tiny", "rollout=vllm_cpu"])
    r = cfg.rollout
    assert (r.engine, r.kv_cache_gb, r.enable_chunked_prefill, r.cpu_bind, r.enforce_eager) == ("vllm", 1, False, "all", True)
    with pytest.raises(ValueError, match="rollout.cpu_bind='two'"):
        compose(["experiment=tiny", "rollout=vllm_cpu", "rollout.cpu_bind=two"])
    with pytest.raises(ValueError, match="rollout.kv_cache_gb must be > 0"):
        compose(["experiment=tiny", "rollout=vllm_cpu", "rollout.kv_cache_gb=0"])


def test_mistral7b_sppo_holds_the_papers_values():
    _, cfg = compose(["experiment=mistral7b_sppo"])
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-Instruct-v0.2" and cfg.model.dtype == "bfloat16"
    r = cfg.rollout
    assert (r.engine, r.num_samples, r.temperature, r.top_p) == ("vllm", 5, 0.7, 0.9)
    assert cfg.judge.name == "pairrm" and cfg.judge.pairrm.name_or_path == "llm-blender/PairRM"
    l = cfg.learner  # noqa: E741
    assert (l.loss, l.beta, 1 / l.beta) == ("sppo", 0.001, 1000)  # η = 1000
    assert (l.lr, l.optimizer, l.global_batch_size, l.warmup_ratio) == (5e-7, "rmsprop", 64, 0.1)
    assert (l.bf16, l.zero_stage, l.gradient_checkpointing, l.epochs) == (True, 3, True, 1)
    assert (l.max_length, l.max_prompt_length) == (1024, 512)
    assert cfg.run.iterations == 3
    d = cfg.data
    assert (d.format, d.prompt_field, d.prompts_per_iteration) == ("parquet", "prompt", 20000)
    assert d.source == "/mnt/shared/spo_ray/data/ultrafeedback_prompts.parquet"
    assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == 8  # the paper's 8 × A100


def test_the_default_experiment_is_the_smollm2_demo():
    _, cfg = compose()
    assert cfg.experiment == "smollm2_demo" and cfg.model.gguf_file == "shipped" and cfg.model.name_or_path is None
    assert cfg.judge.name == "reference" and cfg.data.format == "alpaca_eval" and cfg.cluster.gpus_per_node == 0
    assert cfg.run.iterations >= 2


def test_smollm2_sppo_is_the_result_run_the_issue_asks_for():
    demo, result = _container("smollm2_demo"), _container("smollm2_sppo")
    _, cfg = compose(["experiment=smollm2_sppo"])
    assert cfg.run.iterations == 3 and cfg.data.prompts_per_iteration >= 150 and cfg.data.num_eval >= 200
    assert cfg.evaluate.mt_bench_source == "shipped" and cfg.evaluate.mt_bench_turns == 2
    assert (demo["model"], demo["judge"]["name"], demo["data"]["source"]) == (result["model"], "reference", result["data"]["source"])


def _container(experiment: str) -> dict:
    raw, _ = compose([f"experiment={experiment}", "run.dir=/mnt/shared/spo_ray/runs/x"])
    return OmegaConf.to_container(raw, resolve=True)


def test_llama3_preset_is_the_mistral_recipe_with_another_policy():
    mistral, llama = _container("mistral7b_sppo"), _container("llama3_8b_sppo")
    assert llama["model"]["name_or_path"] == "meta-llama/Meta-Llama-3-8B-Instruct"
    for c in (mistral, llama):
        del c["model"], c["experiment"]
    assert llama == mistral


@pytest.mark.parametrize("baseline, loss, beta", [("mistral7b_dpo", "dpo", 0.01), ("mistral7b_ipo", "ipo", 0.01)])
def test_baselines_are_the_sppo_pipeline_with_another_loss(baseline, loss, beta):
    sppo, other = _container("mistral7b_sppo"), _container(baseline)
    assert (other["learner"]["loss"], other["learner"]["beta"]) == (loss, beta)
    for c in (sppo, other):
        del c["learner"]["loss"], c["learner"]["beta"], c["experiment"]
    assert other == sppo


# ---------------------------------------------------------------------------- comments
def uncommented_fields(text: str) -> list[str]:
    """Lines that set a value without a comment on the line or the line above (verl's rule).
    Section headers and the defaults list are not fields."""
    missing, in_defaults, previous = [], False, ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if line and not line[0].isspace():
            in_defaults = stripped.startswith("defaults:")
        field = re.match(r"([\w.<>-]+):\s*(.*)$", stripped)
        is_leaf = field and field.group(2) and not field.group(2).startswith("#")
        if is_leaf and not in_defaults and " #" not in field.group(2) and not previous.startswith("#"):
            missing.append(f"line {number}: {stripped}")
        previous = stripped
    return missing


CONF_FILES = sorted(p.relative_to(REPO).as_posix() for p in CONF.rglob("*.yaml"))
KNOWN_UNCOMMENTED: set[str] = set()  # files allowed to lack comments (none)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="uncommented overrides")) if p in KNOWN_UNCOMMENTED else p
        for p in CONF_FILES
    ],
)
def test_every_yaml_field_in_conf_has_a_comment(path):
    assert uncommented_fields((REPO / path).read_text()) == []


def test_the_comment_rule_itself():
    text = "# header\ndefaults:\n  - model: tiny\nrun:\n  dir: x  # the dir\n  # why\n  seed: 0\n  bad: 1\n"
    assert uncommented_fields(text) == ["line 8: bad: 1"]


# ---------------------------------------------------------------------------- typos, types
@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.lrr=1", "learner.lrr"),  # unknown key
        ("learner.lr=abc", "learner.lr"),  # wrong type
        ("cluster.rollout.num_gpu=1", "cluster.rollout.num_gpu"),
        ("cluster.nodes=two", "cluster.nodes"),
        ("run.iterations=1.5", "run.iterations"),
    ],
)
def test_a_typo_or_a_wrong_type_fails_at_compose_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert key in str(info.value)


def test_an_appended_unknown_key_is_refused_too():
    # Hydra's own hint for an unknown key is `+learner.lrr=1`, which OmegaConf would accept.
    with pytest.raises(ValueError, match=r"unknown key\(s\) learner.lrr"):
        compose(["+learner.lrr=1"])


def _compose_from(conf_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from spo_ray.compose import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        return validate(hydra_compose(config_name="config", overrides=overrides))


@pytest.mark.parametrize(
    "old, new, key",
    [
        ("gpus_per_node: 8 ", "gpus_per_node: eight ", "gpus_per_node"),
        ("  num_gpus: 0.5 ", "  num_gpu: 0.5 ", "num_gpu"),
    ],
)
def test_a_typo_in_a_preset_file_fails_at_compose_naming_the_key(tmp_path, old, new, key):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    preset = conf / "cluster" / "a100x8.yaml"
    assert old in preset.read_text()
    preset.write_text(preset.read_text().replace(old, new, 1))
    with pytest.raises(ConfigCompositionException) as info:
        _compose_from(conf, ["experiment=mistral7b_sppo"])
    assert key in f"{info.value} {info.value.__cause__}"


# ---------------------------------------------------------------------------- placement
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.rollout.num_actors=4"], "reserve 9 GPUs"),
        (["cluster.rollout.num_actors=2", "cluster.judge.num_actors=1", "cluster.judge.num_gpus=1.5"], "fraction below 1 or a whole"),
        (["cluster.evaluate.num_gpus=16"], "cannot span machines"),
        (["cluster.learner.num_workers=3", "cluster.rollout.num_actors=4"], "micro_batch_size × cluster.learner.num_workers"),
        (["cluster.storage=s3://bucket/spo_ray"], "mount the bucket"),
        (["cluster=a100x8x4", "cluster.storage=shared/spo_ray"], "must be an absolute path"),
        (["run.dir=runs/mistral"], "run.dir='runs/mistral' is relative"),
    ],
)
def test_a_placement_or_storage_that_cannot_work_fails_before_ray(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compose(["experiment=mistral7b_sppo", *overrides])


def test_gpus_on_a_machine_without_gpus_fail_before_ray():
    with pytest.raises(ValueError, match="reserve 1 GPUs"):
        compose(["cluster.rollout.num_gpus=1"])


# ---------------------------------------------------------------------------- cluster/ files
def _documented_train_commands() -> list[list[str]]:
    """The `python -m spo_ray.train ...` arguments of cluster/README.md and the RayJob."""
    blocks = re.findall(r"```bash\n(.*?)```", (CLUSTER_DIR / "README.md").read_text(), flags=re.S)
    lines = re.sub(r"\\\n\s*", " ", "\n".join(blocks)).splitlines()
    commands = [line.split("python -m spo_ray.train", 1)[1] for line in lines if "python -m spo_ray.train" in line]
    rayjob = next(d for d in yaml.safe_load_all((CLUSTER_DIR / "kuberay-rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    commands.append(rayjob["spec"]["entrypoint"].split("python -m spo_ray.train", 1)[1])
    args = [[a for a in shlex.split(c.strip(" `'")) if a != "-m" and not a.startswith("hydra.")] for c in commands]
    return [a for a in args if a]


def test_every_documented_training_command_composes_and_validates():
    commands = _documented_train_commands()
    assert len(commands) >= 7  # smoke test, 4 paper runs, a sweep, the RayJob
    for args in commands:
        # A sweep (`key=a,b`) composes once per point.
        choices = [[f"{key}={v}" for v in values.split(",")] for key, values in (a.split("=", 1) for a in args)]
        for point in itertools.product(*choices):
            _, cfg = compose(list(point))
            if cfg.cluster.gpus_per_node:
                assert cfg.run.dir.startswith(cfg.cluster.storage + "/"), point


def test_runtime_env_uploads_the_code_and_nothing_big():
    env = yaml.safe_load((CLUSTER_DIR / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    for excluded in (".git/", ".venv/", "runs/", "multirun/", "outputs/", "**/*.safetensors", "**/*.parquet"):
        assert excluded in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray takes only strings
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert set(env) <= {"working_dir", "excludes", "env_vars"}  # the pip/image examples stay comments


@pytest.mark.parametrize("launcher, instance_key", [("aws-a100x8.yaml", "InstanceType"), ("gcp-a100x8.yaml", "machineType")])
def test_launcher_configs_match_the_gpu_presets(launcher, instance_key):
    config = yaml.safe_load((CLUSTER_DIR / launcher).read_text())
    _, big = compose(["experiment=mistral7b_sppo", "cluster=a100x8x4"])
    gpu = config["available_node_types"]["gpu_a100x8"]
    assert gpu["node_config"][instance_key] in ("p4de.24xlarge", "a2-ultragpu-8g")  # 8 × A100-80GB
    assert gpu["max_workers"] >= big.cluster.nodes and config["max_workers"] >= big.cluster.nodes
    assert config["head_node_type"] == "head"
    assert any("--volume /mnt/shared:/mnt/shared" in o for o in config["docker"]["run_options"])
    assert big.cluster.storage.startswith("/mnt/shared/")


def test_rayjob_matches_the_four_node_preset():
    docs = {d["kind"]: d for d in yaml.safe_load_all((CLUSTER_DIR / "kuberay-rayjob.yaml").read_text())}
    _, cfg = compose(["experiment=mistral7b_sppo", "cluster=a100x8x4"])
    (workers,) = docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == cfg.cluster.nodes
    (container,) = workers["template"]["spec"]["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == cfg.cluster.gpus_per_node
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "cluster=a100x8x4" in docs["RayJob"]["spec"]["entrypoint"]


def test_colocated_placement_counts_the_larger_phase_not_the_sum():
    """Colocated: the engines (held all run) + the larger of judge and learner; split: all."""
    from tests.conftest import compose as compose_validated

    shared = [
        "cluster=a100x8", "experiment=mistral7b_sppo", "cluster.rollout.num_actors=8", "cluster.rollout.num_gpus=0.5",
        "cluster.judge.num_actors=4", "cluster.judge.num_gpus=0.5", "cluster.learner.num_workers=8",
        "cluster.learner.gpus_per_worker=0.5", "learner.global_batch_size=64",
    ]
    with pytest.raises(ValueError, match="reserve 10 GPUs"):
        compose_validated(shared + ["cluster.colocate=false"])
    with pytest.raises(ValueError, match="reserve 12 GPUs"):  # whole-GPU engines leave the learner no room
        compose_validated(shared + ["cluster.colocate=true", "learner.persistent=false", "evaluate.overlap=false", "cluster.rollout.num_actors=4", "cluster.rollout.num_gpus=1", "cluster.learner.gpus_per_worker=1"])
    _, cfg = compose_validated(shared + ["cluster.colocate=true", "learner.persistent=false", "evaluate.overlap=false"])
    assert cfg.cluster.colocate


def test_no_rollout_preset_restates_a_value_it_takes_from_common():
    import yaml

    common = yaml.safe_load((CONF / "rollout" / "common.yaml").read_text())
    for name in _names("rollout") - {"common"}:
        preset = yaml.safe_load((CONF / "rollout" / f"{name}.yaml").read_text())
        assert preset["defaults"][0] == "common", name
        restated = {k: v for k, v in preset.items() if k in common and common[k] == v}
        assert restated == {}, f"conf/rollout/{name}.yaml restates {restated}: common.yaml sets it once"
