"""The adapter study: TeRA variants against head-only, full fine-tuning, LoRA, VeRA and HiRA.

Run from the repository root (results are appended to ``experiments/results/study.jsonl``)::

    python -m experiments.study run --plan screen
    python -m experiments.study status --plan screen

Every run goes through the library's recipe (:func:`tera_tn.finetune.finetune`); this package adds
the data (:mod:`experiments.datasets`), the plans (:mod:`experiments.study.plans`), the resumable
runner with its learning-rate grid extension (:mod:`experiments.study.runner`) and the results
file (:mod:`experiments.study.results`). Start long studies from a git worktree pinned to a
commit, so that edits to the checkout never change a running study; each line records the commit.
"""
