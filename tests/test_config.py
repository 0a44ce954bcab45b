import pytest
import torch

from tests.conftest import compose


def test_tiny_config_composes_and_validates():
    raw, cfg = compose(["experiment=tiny"])
    assert cfg.experiment == "tiny" and cfg.model.random_init is not None
    assert cfg.learner.loss == "sppo" and cfg.rollout.num_samples >= 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("learner.loss=kto", "learner.loss"),
        ("learner.lr=0", "learner.lr"),
        ("learner.num_threads=0", "learner.num_threads"),
        ("rollout.num_samples=1", "rollout.num_samples"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("learner.global_batch_size=7", "global_batch_size"),
        ("learner.max_prompt_length=4096", "max_prompt_length"),
        ("judge.name=nope", "judge.name"),
        ("learner.bf16=true", "bf16"),
        ("model.name_or_path=some/model", "exactly one"),
        ("model.gguf_file=x.gguf", "exactly one"),
        ("evaluate.mt_bench_turns=3", "evaluate.mt_bench_turns"),
        ("rollout.weight_sync=disk", "rollout.weight_sync"),
        ("rollout.dtype=int8", "rollout.dtype"),
        ("rollout.weight_sync_bucket_mb=0", "rollout.weight_sync_bucket_mb"),
        ("rollout.weight_sync=nccl cluster.colocate=true", "NCCL refuses two ranks"),
        ("cluster.colocate=true", "set learner.persistent=false"),
        ("rollout.weight_sync=nccl cluster.gpus_per_node=1 cluster.learner.gpus_per_worker=1", "same kind of device"),
    ],
)
def test_invalid_values_fail_before_ray_with_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        compose(["experiment=tiny", *override.split()])


def test_a_vllm_engine_holds_as_many_gpus_as_its_tensor_parallel_workers():
    with pytest.raises(ValueError, match="cluster.rollout.num_gpus must be 2"):
        compose(["experiment=mistral7b_sppo", "rollout.tensor_parallel_size=2"])
    _, cfg = compose(["experiment=mistral7b_sppo", "rollout.tensor_parallel_size=2", "cluster.rollout.num_gpus=2", "cluster.rollout.num_actors=1"])
    assert cfg.cluster.rollout.num_gpus == 2


def test_the_engines_dtype_is_rollout_dtype_else_the_models(tiny_policy, monkeypatch):
    from spo_ray import config as config_module
    from spo_ray.config import engine_dtype
    from spo_ray.rollout.factory import make_engine

    _, demo = compose([])  # the default experiment: vLLM's CPU build, bf16 where the CPU has it in hardware
    assert (demo.rollout.engine, demo.rollout.dtype, demo.model.dtype) == ("vllm", "auto", "float32")
    monkeypatch.setattr(config_module, "cpu_has_fast_bf16", lambda: True)
    assert engine_dtype(demo) == "bfloat16"
    monkeypatch.setattr(config_module, "cpu_has_fast_bf16", lambda: False)
    assert engine_dtype(demo) == "float32"  # AVX2 only: bf16 is emulated, 3.3× slower
    _, gpu = compose(["experiment=mistral7b_sppo", "rollout.dtype=auto"])
    assert engine_dtype(gpu) == "bfloat16"
    _, hf = compose(["rollout=hf"])
    assert hf.rollout.dtype is None and engine_dtype(hf) == "float32"
    _, tiny = compose(["experiment=tiny", "rollout.dtype=bfloat16"])
    engine = make_engine(tiny, tiny_policy)
    assert next(engine.model.parameters()).dtype == torch.bfloat16


def test_the_placement_line_names_every_pool_and_what_each_actor_reserves():
    _, cfg = compose(["experiment=mistral7b_sppo", "cluster=a100x8x4"])
    c = cfg.cluster
    line = c.placement()
    assert f"{c.rollout.num_actors} rollout engines × ({c.rollout.num_cpus:g} CPU, {c.rollout.num_gpus:g} GPU)" in line
    assert f"{c.learner.num_workers} learner workers × ({c.learner.cpus_per_worker:g} CPU, 1 GPU)" in line
    assert "judge actors" in line and "evaluation" in line and line.endswith("(disjoint)")


def test_unknown_key_and_wrong_type_fail_at_compose():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose(["experiment=tiny", "learner.lrr=1"])
    with pytest.raises(ConfigCompositionException, match="learner.lr"):
        compose(["experiment=tiny", "learner.lr=abc"])


def test_a_validated_config_is_read_only_and_survives_pickling():
    import dataclasses
    import pickle

    _, cfg = compose(["experiment=tiny", "learner.lr=0.001"])  # Hydra overrides still apply
    assert cfg.learner.lr == 0.001
    for section, name in ((cfg, "experiment"), (cfg.learner, "lr"), (cfg.cluster.learner, "num_workers"), (cfg.run.timeouts, "eval_s")):
        with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
            setattr(section, name, getattr(section, name))
    copy = pickle.loads(pickle.dumps(cfg))  # as Ray ships it to actors and workers
    assert copy == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.learner.lr = 1.0
    changed = dataclasses.replace(cfg.learner, lr=0.5)  # a changed copy is the way
    assert changed.lr == 0.5 and cfg.learner.lr == 0.001
