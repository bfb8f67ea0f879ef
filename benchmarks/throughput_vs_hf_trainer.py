"""LoRA training throughput: rankwise's loop vs a Hugging Face ``Trainer`` + peft run.

Same model (MiniLM), same data (the run config's SST-2 subset, tokenised once), same batch
size, same padding policy (dynamic padding to the longest sequence in the batch), same LoRA
config, same optimiser and schedule. Both measured in one process, alternating
(rankwise, HF, rankwise, HF, ...), each for ``--steps`` optimizer steps after ``--warmup``
untimed steps; reports examples/s per repetition and the median ratio.

    python benchmarks/throughput_vs_hf_trainer.py --steps 40 --reps 2 --out bench-throughput.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def rankwise_examples_per_s(job, data, steps: int, warmup: int) -> float:
    from rankwise.training.loop import Trainer

    trainer = Trainer(job, job.run.training.seed, Path("/tmp") / "rankwise-bench" / "seed", data=data)
    trainer.model.train()
    from rankwise.data.loading import batches, epoch_permutation

    order = epoch_permutation(len(data.train), trainer.seed, 0)
    it = batches(data.train, order, trainer.t.batch_size, trainer.collate)
    def step():
        batch = next(it)
        trainer.train_step(batch)
        return len(batch["labels"])

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    n = sum(step() for _ in range(steps))
    return n / (time.perf_counter() - t0)


def hf_trainer_examples_per_s(job, data, steps: int, warmup: int) -> float:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)

    from rankwise.methods.targets import resolve_target_modules
    from rankwise.models import load_backbone

    t = job.run.training
    a = job.run.model.adapter
    torch.manual_seed(t.seed)
    model, tok = load_backbone(job.run.model.name, 2)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=a.rank, lora_alpha=a.lora_alpha,
                                             lora_dropout=a.dropout,
                                             target_modules=resolve_target_modules(model)))
    train = data.train.remove_columns([c for c in ("idx",) if c in data.train.column_names])

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.elapsed = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == warmup:
                self.t0 = time.perf_counter()
            if state.global_step == warmup + steps:
                self.elapsed = time.perf_counter() - self.t0
                control.should_training_stop = True

    timer = Timer()
    args = TrainingArguments(
        output_dir="/tmp/rankwise-bench-hf", per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate, weight_decay=t.weight_decay, lr_scheduler_type="linear",
        max_steps=warmup + steps, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to=[], seed=t.seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        max_grad_norm=t.max_grad_norm or 0.0)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tok), callbacks=[timer])
    trainer.train()
    return steps * t.batch_size / timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="minilm-sst2-lora")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="bench-throughput.json")
    args = parser.parse_args()

    from rankwise.config.loader import load_job
    from rankwise.data.loading import load_task_data
    from rankwise.models import default_cache_dir, load_backbone

    job = load_job([f"run={args.run}", "training.max_grad_norm=1.0"])
    _, tok = load_backbone(job.run.model.name, 2)
    data = load_task_data(job.run.dataset, tok, default_cache_dir())
    results = {"rankwise": [], "hf_trainer": []}
    for _ in range(args.reps):
        results["rankwise"].append(rankwise_examples_per_s(job, data, args.steps, args.warmup))
        results["hf_trainer"].append(hf_trainer_examples_per_s(job, data, args.steps, args.warmup))
        print({k: [round(x, 2) for x in v] for k, v in results.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    from rankwise.results import device_description

    report = {"run": args.run, "steps": args.steps, "warmup": args.warmup, "reps": args.reps,
              "batch_size": job.run.training.batch_size, "padding": "dynamic (longest in batch)",
              "examples_per_s": results, "median_examples_per_s": med,
              "ratio_rankwise_over_hf": med["rankwise"] / med["hf_trainer"],
              "device": device_description(torch.device("cpu"))}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("median_examples_per_s", "ratio_rankwise_over_hf")}, indent=2))


if __name__ == "__main__":
    main()
