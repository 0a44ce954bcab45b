"""What runs inside vLLM's worker processes: `SpoWorkerExtension`, mixed into each worker by
`worker_extension_cls` (spo_ray.rollout.vllm.EXTENSION), and the helpers it uses. The owner
side, `VLLMEngine`, is in spo_ray/rollout/vllm.py and calls these through `collective_rpc`."""

from __future__ import annotations

import logging
from typing import Any


class _IntendedCasts(logging.Filter):
    """vLLM warns once per tensor when it narrows a checkpoint's dtype to the engine's; with
    `rollout.dtype` bfloat16 over float32 policies that cast is the point (hundreds of lines
    per load otherwise). Installed where this module is imported: the owner and, through
    `worker_extension_cls`, each worker before it loads the model."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Attempted to load weight %s with dtype")


logging.getLogger("vllm.model_executor.models.utils").addFilter(_IntendedCasts())


class SpoWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`; GPU and CPU workers alike), so
    `collective_rpc` can call these methods in every worker process of an engine. vLLM
    refuses extension attributes that the worker already has: every name here starts with
    `spo_`.

    New weights go through the worker's `reload_weights(weights_iterator=…,
    is_checkpoint_format=True)`: checkpoint-named full tensors, sharded for this worker's
    tensor-parallel rank and turned into each layer's kernel format by vLLM's layer-wise
    reload, whether they come from storage or from a broadcast.
    """

    def spo_load_checkpoint(self, path: str) -> int:
        from spo_ray.rollout.weight_sync import checkpoint_tensors

        counted = _Counted(checkpoint_tensors(path))
        self.spo_reload(counted)
        return counted.count

    def spo_reload(self, weights) -> None:
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        spo_refresh_tied_layers(self.get_model())

    def spo_init_weight_sync(self, spec: dict, rank_offset: int) -> None:
        from spo_ray.rollout.weight_sync import SyncGroupSpec, create_sync_group

        self.spo_sync_group = create_sync_group(SyncGroupSpec.from_dict(spec), rank_offset + self.rank, self.device)

    def spo_receive_weights(self, plan: dict) -> int:
        from spo_ray.rollout.weight_sync import WeightPlan, receive_weights

        return receive_weights(WeightPlan.from_dict(plan), self.spo_sync_group, self.spo_reload)

    def spo_close_weight_sync(self) -> None:
        group = getattr(self, "spo_sync_group", None)
        if group is not None:
            group.close()
            self.spo_sync_group = None


def spo_refresh_tied_layers(model: Any) -> int:
    """Rebuild the kernel format of layers that share their weight with another layer.

    A tied output embedding (`lm_head.weight is embed_tokens.weight`) has no tensor of its
    own in the checkpoint, so vLLM's layer-wise reload never completes that layer and never
    reprocesses it: on the CPU build its prepacked copy keeps the old policy and the answers
    are silently wrong. Returns the number of layers rebuilt."""
    layers: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and getattr(module, "quant_method", None) is not None:
            layers.setdefault(id(weight), []).append(module)
    refreshed = 0
    for shared in layers.values():
        if len(shared) > 1:
            for module in shared:
                module.quant_method.process_weights_after_loading(module)
                refreshed += 1
    return refreshed


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
