"""VLLMEngine: K samples per prompt from a `vllm.LLM` (GPUs; optional extra `spo_ray[vllm]`).

Every vLLM-specific call of spo_ray is in this file, and `VLLM_API` lists each one with the
keyword arguments or attributes used. Written against vLLM 0.11.0 (the extra's floor) and
0.33.0 (the newest release when written); `benchmarks/check_vllm_api.py` checks `VLLM_API`
against an installed vLLM (or its unpacked sources), and tests/test_vllm_engine.py checks
that this file passes vLLM nothing that `VLLM_API` does not list.

What the engine does with vLLM:
- one `vllm.LLM` per engine (tensor_parallel_size GPUs), built from `conf/rollout/`;
- `generate`: the chat template applied here (`format_prompt`, as HFEngine does), prompts
  passed as token ids (`TokensPrompt`) so vLLM adds no second BOS, one request of
  `SamplingParams(n=K, seed=s)` per prompt (vLLM gives the K children seeds s, s+1, …);
- `load_weights(path)`: π_{t+1} in place, from the checkpoint's safetensors, through a
  worker extension (`SpoWorkerExtension`, the model's own `load_weights`) called with
  `collective_rpc`; when that fails or vLLM lacks it, the `LLM` is shut down and built
  again from `path`. Both under one timeout;
- `sleep`/`wake_up` for colocated placement (`cluster.colocate: true`): the engine frees
  its GPU memory while the learner trains on the same GPUs;
- `init_weight_sync`/`receive_weights`: the NCCL broadcast path of `weight_sync`.
"""

from __future__ import annotations

import gc
import importlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence, TypeVar

from spo_ray.rollout.base import Rollout, SamplingConfig
from spo_ray.rollout.hf import format_prompt

if TYPE_CHECKING:
    from spo_ray.config import Config
    from spo_ray.rollout.weight_sync import SyncGroupSpec, WeightPlan

log = logging.getLogger(__name__)

VLLM_VERSIONS = ("0.11.0", "0.33.0")  # checked with benchmarks/check_vllm_api.py (static)
# How long one reload of π may take, in-place attempt and rebuild together. A 7B policy
# rebuilds in 1–3 minutes (weights, CUDA graphs); the in-place path takes seconds.
DEFAULT_RELOAD_TIMEOUT_S = 900.0
EXTENSION = "spo_ray.rollout.vllm.SpoWorkerExtension"
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
    # SpoWorkerExtension runs inside vLLM's GPU worker and uses these of it:
    VLLMUse("attrs", "vllm.v1.worker.gpu_worker.Worker", ("get_model", "rank", "device")),
    VLLMUse("call", "vllm.model_executor.models.llama.LlamaForCausalLM.load_weights", ("weights",)),
    VLLMUse("call", "vllm.model_executor.models.qwen2.Qwen2ForCausalLM.load_weights", ("weights",)),
)


def import_vllm() -> Any:
    """vLLM, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(
            f"rollout.engine=vllm needs vLLM ({err}). Install the extra on the GPU nodes: "
            "pip install 'spo_ray[vllm]' (or set rollout.engine=hf)"
        ) from err


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
    ) -> None:
        self._vllm = import_vllm()
        self.llm_kwargs: dict[str, Any] = dict(
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enforce_eager=enforce_eager,
            seed=seed,
            trust_remote_code=trust_remote_code,
            enable_sleep_mode=enable_sleep_mode,
            worker_extension_cls=EXTENSION,
        )
        if max_model_len is not None:  # None: vLLM takes the model config's length
            self.llm_kwargs["max_model_len"] = max_model_len
        self.trust_remote_code = trust_remote_code
        self.max_prompt_tokens = max_prompt_tokens
        self.reload_timeout_s = reload_timeout_s
        self.asleep = False
        self.sleep_level = 0
        self.path = path
        self.llm = self._build(path)
        self.tokenizer = self._tokenizer(path)

    @classmethod
    def from_config(cls, cfg: "Config", policy_path: str) -> "VLLMEngine":
        r = cfg.rollout
        return cls(
            policy_path,
            dtype=cfg.model.dtype,
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
        TimeoutError when both together take longer than `reload_timeout_s`."""
        deadline = time.monotonic() + self.reload_timeout_s
        try:
            count = _within(self.reload_timeout_s, "in-place weight reload", lambda: self._load_in_place(path))
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
        if self.asleep:  # only the weights' memory back: the KV cache waits for wake_up
            self.llm.wake_up(tags=["weights"])
        counts = self.llm.collective_rpc("spo_load_checkpoint", timeout=self.reload_timeout_s, args=(path,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by π_t
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return min(counts)

    # ------------------------------------------------------------------------- colocated
    def sleep(self, level: int = 1) -> None:
        """Free the GPU for the learner: level 1 keeps the weights in CPU memory (wake up to
        the same policy), level 2 drops them (the next `load_weights` brings π_{t+1})."""
        if not self.llm_kwargs["enable_sleep_mode"]:
            raise RuntimeError("this engine was built without sleep mode: set cluster.colocate=true")
        if not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = True
            self.sleep_level = level

    def wake_up(self) -> None:
        if self.asleep:
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
        log.info("starting vLLM %s on %s", getattr(self._vllm, "__version__", "?"), path)
        return self._vllm.LLM(model=path, **self.llm_kwargs)

    def _tokenizer(self, path: str):
        from spo_ray.modeling import load_tokenizer

        tokenizer = load_tokenizer(path, self.trust_remote_code)
        tokenizer.truncation_side = "left"  # an over-long prompt keeps its end, as in HFEngine and the learner
        return tokenizer

    def _shutdown(self) -> None:
        """Stop the engine's processes and free its GPU memory before a rebuild."""
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


class SpoWorkerExtension:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`), so `collective_rpc` can call
    these methods in every worker process of an engine. vLLM refuses extension attributes
    that the worker already has: every name here starts with `spo_`.

    The model's `load_weights` takes checkpoint-named full tensors and shards them for this
    worker's tensor-parallel rank (unquantized models; a quantized rollout would need
    vLLM's layerwise reload instead).
    """

    def spo_load_checkpoint(self, path: str) -> int:
        from spo_ray.rollout.weight_sync import checkpoint_tensors

        counted = _Counted(checkpoint_tensors(path))
        self.get_model().load_weights(weights=counted)
        return counted.count

    def spo_init_weight_sync(self, spec: dict, rank_offset: int) -> None:
        from spo_ray.rollout.weight_sync import SyncGroupSpec, create_sync_group

        self.spo_sync_group = create_sync_group(SyncGroupSpec.from_dict(spec), rank_offset + self.rank, self.device)

    def spo_receive_weights(self, plan: dict) -> int:
        from spo_ray.rollout.weight_sync import WeightPlan, receive_weights

        model = self.get_model()
        return receive_weights(WeightPlan.from_dict(plan), self.spo_sync_group, lambda ws: model.load_weights(weights=ws))

    def spo_close_weight_sync(self) -> None:
        group = getattr(self, "spo_sync_group", None)
        if group is not None:
            group.close()
            self.spo_sync_group = None


class _Counted:
    """An iterator that counts what the consumer took."""

    def __init__(self, items) -> None:
        self._items = iter(items)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.count += 1
        return item
