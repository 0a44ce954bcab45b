"""HFEngine: batched Hugging Face `generate`, K samples per prompt (CPU or one GPU)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch

from spo_ray.data.chat import format_prompt
from spo_ray.modeling import load_policy, load_tokenizer
from spo_ray.rollout.base import Prompt, Rollout, SamplingConfig

if TYPE_CHECKING:
    from spo_ray.rollout.weight_sync import SyncGroupSpec, WeightPlan

log = logging.getLogger(__name__)


class HFEngine:
    """Samples with `model.generate`; prompts are left-padded into one batch.

    `seed` plus the batch's first prompt index make sampling reproducible per batch,
    whatever actor runs it.
    """

    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        device: str | None = None,
        trust_remote_code: bool = False,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.max_prompt_tokens = max_prompt_tokens
        self.path = ""
        self.model = None
        self.asleep = False
        self.load_weights(path)

    def load_weights(self, path: str) -> None:
        """π from the HF folder `path`: copied into the loaded model's own tensors when it
        has the same parameters (no new allocation, as vLLM's in-place reload), else built."""
        if self.model is None or not self._copy_in_place(path):
            self.model = load_policy(path, self.dtype, self.device, self.trust_remote_code).eval()
        self.asleep = False
        self.tokenizer = load_tokenizer(path, self.trust_remote_code)
        self.tokenizer.padding_side = "left"
        # A prompt over max_prompt_tokens keeps its last tokens (the assistant turn's start),
        # as the learner's collate_pairs does, so both see the same prompt.
        self.tokenizer.truncation_side = "left"
        self.path = path

    @torch.no_grad()
    def _copy_in_place(self, path: str) -> bool:
        from spo_ray.rollout.weight_sync import checkpoint_tensors

        if self.asleep:
            self.wake_up()
        tensors = self.model.state_dict()  # tied weights appear under both names, one storage
        incoming = dict(checkpoint_tensors(path))
        required = {name for name, _ in self.model.named_parameters()}
        if set(incoming) - set(tensors) or required - set(incoming) or any(incoming[n].shape != tensors[n].shape for n in incoming):
            log.info("%s does not match the loaded model's parameters: building the model again", path)
            return False
        self._copy(incoming.items())
        return True

    def _copy(self, named) -> None:
        tensors = self.model.state_dict()
        for name, tensor in named:
            tensors[name].copy_(tensor)

    # ------------------------------------------------------------------------- colocated
    def sleep(self, level: int = 1) -> None:
        """Free the accelerator: level 1 moves the weights to CPU memory, level 2 drops them
        (the next `load_weights` builds the model again)."""
        if level == 2:
            self.model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        elif self.device.type != "cpu":
            self.model.to("cpu")
        self.asleep = True

    def shutdown(self) -> None:
        """Free the model (the engine is unusable after this); it starts no processes."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.asleep and self.model is not None:
            self.model.to(self.device)
            self.asleep = False

    # ------------------------------------------------------------------------- weight sync
    sync_world_size = 1  # ranks this engine takes in a weight-sync group

    def init_weight_sync(self, spec: "SyncGroupSpec", rank_offset: int) -> None:
        from spo_ray.rollout.weight_sync import create_sync_group

        self._sync_group = create_sync_group(spec, rank_offset, self.device)

    @torch.no_grad()
    def receive_weights(self, plan: "WeightPlan") -> int:
        """One broadcast of π_{t+1} from the learner (`weight_sync.send_weights`), bucket by
        bucket into the model's tensors."""
        from spo_ray.rollout.weight_sync import receive_weights

        return receive_weights(plan, self._sync_group, self._copy)

    def close_weight_sync(self) -> None:
        group, self._sync_group = getattr(self, "_sync_group", None), None
        if group is not None:
            group.close()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> list[Rollout]:
        if not prompts:
            return []
        if self.asleep:
            raise RuntimeError("the engine is asleep: call load_weights() or wake_up() before generate()")
        texts = [format_prompt(self.tokenizer, p) for p in prompts]
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            truncation=self.max_prompt_tokens is not None,
            max_length=self.max_prompt_tokens,
        ).to(self.device)
        greedy = sampling.temperature == 0
        k = sampling.num_samples
        torch.manual_seed(sampling.seed)
        out = self.model.generate(
            **enc,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1 if greedy else k,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :].cpu()
        if greedy:  # K greedy samples are one answer, repeated
            new = new.repeat_interleave(k, dim=0)
        rollouts = []
        for i in range(len(prompts)):
            responses, counts, truncated = [], [], []
            for row in new[i * k : (i + 1) * k]:
                n, hit_eos = _generated_length(row.tolist(), self.tokenizer.eos_token_id)
                responses.append(self.tokenizer.decode(row[:n], skip_special_tokens=True).strip())
                counts.append(n)
                truncated.append(not hit_eos)
            rollouts.append(Rollout(responses=responses, num_tokens=counts, truncated=truncated))
        return rollouts


def _generated_length(ids: list[int], eos_id: int) -> tuple[int, bool]:
    """Tokens up to and including the first EOS (padding after it excluded)."""
    if eos_id in ids:
        return ids.index(eos_id) + 1, True
    return len(ids), False
