"""LoRA training throughput: rankwise's loop vs a Hugging Face ``Trainer`` + peft run.

Now a shortcut for ``python -m rankwise.bench train`` with ``methods=[lora]`` and
``hf_trainer=true`` (same model, rows, order, batch size, padding, LoRA config, learning
rate and schedule; the two alternate step by step in one process). Extra ``key=value``
arguments go to ``bench train`` (e.g. ``steps=20 pad_to=64 out=DIR``).

    python benchmarks/throughput_vs_hf_trainer.py [run=minilm-sst2-lora] [steps=20] [out=DIR]
"""

from __future__ import annotations

import sys

from rankwise.bench.__main__ import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("run=") for a in args):
        args.insert(0, "run=minilm-sst2-lora")
    sys.exit(main(["train", "methods=[lora]", "hf_trainer=true", *args]))
