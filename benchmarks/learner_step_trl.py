"""TRL's DPOTrainer on the same work as benchmarks/learner_step.py, for a side-by-side figure.

Run by `learner_step.py --trl-python PYTHON` with the interpreter of a venv that has TRL
(TRL is not a dependency of spo_ray), e.g.

    python -m venv /tmp/trl && /tmp/trl/bin/pip install trl
    PYTHONPATH=. python benchmarks/learner_step.py --trl-python /tmp/trl/bin/python

Reads a JSON job (the model folder, the pair rows with their prompts already chat-templated
as spo_ray's learner tokenizes them, the batch, β, lr, steps) and writes each step's seconds
and loss. Loss `sppo_hard` ((a − η/2)² + (b + η/2)², as spo_ray's of that name), AdamW, the
rows in the given order (no shuffling), fp32 on CPU. Imports nothing from spo_ray.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time


def main(job_path: str, out_path: str) -> None:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    import trl

    job = json.loads(open(job_path).read())
    tokenizer = AutoTokenizer.from_pretrained(job["policy"])
    model = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(job["policy"], dtype=torch.float32)
    rows = job["rows"]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=job["micro_batch_size"],
            gradient_accumulation_steps=job["accumulation_steps"], learning_rate=job["lr"], beta=job["beta"],
            loss_type=["sppo_hard"], max_steps=job["steps"], lr_scheduler_type="linear", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=job["grad_clip"], max_length=job["max_length"], logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
            # TRL's own defaults differ from TrainingArguments' here (bf16 autocast, activation
            # checkpointing on); spo_ray's side runs fp32 without checkpointing, so does TRL's.
            bf16=False, gradient_checkpointing=False,
        )
        trainer = InOrder(model=model, ref_model=reference, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {"trl": trl.__version__, "optimizer": str(config.optim), "step_s": timer.times, "losses": losses}
    open(out_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
