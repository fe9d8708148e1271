"""TRL's GRPOTrainer at the settings bench/vs_trl.py gives it; run by that script in TRL's own venv.

Writes a JSON with the wall time of every optimizer step, the mean completion length and the mean
reward per step. The reward is the synthetic task's: the last \\boxed{} integer against the answer.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def reward(completions, answer, **kwargs):
    out = []
    for completion, gold in zip(completions, answer):
        text = completion[0]["content"] if isinstance(completion, list) else completion
        found = BOXED.findall(text)
        out.append(1.0 if found and found[-1] == str(gold).strip() else 0.0)
    return out


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.logs, self._t = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.logs.append(dict(logs))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on", help="TRL's default: on")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = [json.loads(line) for line in open(a.data)]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}], "answer": r["answer"]}
                            for r in rows])
    n = a.questions * a.samples
    args = GRPOConfig(output_dir=a.out + ".trl", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                      max_steps=a.steps, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
                      per_device_train_batch_size=n, num_generations=a.samples,
                      steps_per_generation=1, gradient_accumulation_steps=1, num_iterations=1,
                      max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, beta=0.0,
                      epsilon=0.2, loss_type="grpo", scale_rewards="group", logging_steps=1, seed=a.seed,
                      dataloader_num_workers=0, gradient_checkpointing=a.gradient_checkpointing == "on")
    timer = StepTimer()
    trainer = GRPOTrainer(model=a.model, reward_funcs=reward, args=args, train_dataset=ds, callbacks=[timer])
    trainer.train()
    lengths = [g["completions/mean_length"] for g in timer.logs if "completions/mean_length" in g]
    rewards = [g["reward"] for g in timer.logs if "reward" in g]
    json.dump({"step_s": timer.times, "response_len_mean": lengths, "reward": rewards}, open(a.out, "w"))


if __name__ == "__main__":
    main()
