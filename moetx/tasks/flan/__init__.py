"""FLAN instruction tuning for moetx: templates, tasks, clusters, mixtures, rank-classification
evaluation. Importing this package registers every FLAN task and mixture (no data is read or
fetched until a task is first read; see `sources`).

Modules: `sources` (offline labeled data from registry packages), `templates` (ten patterns per
dataset), `preprocessors` (round-robin templates, rank-classification rows, few-shot assembly),
`tasks` (SeqIO tasks), `clusters`, `mixtures`, `metrics`, `evaluate` (the eval command).

Quick start (offline, after `python -m moetx.tasks.corpora`):

    python -m moetx.trainer.train --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_finetune.gin --gin.MODEL_DIR="'runs/flan_no_tc'"
    python -m moetx.tasks.flan.evaluate --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_eval.gin --gin.CHECKPOINT_DIR="'runs/flan_no_tc'"
"""

from moetx.tasks.flan import clusters, metrics, mixtures, preprocessors, sources, tasks, templates
from moetx.tasks.flan.mixtures import leave_one_out_mixture, register_flan_mixtures
from moetx.tasks.flan.tasks import register_flan_tasks

__all__ = [
    "clusters",
    "leave_one_out_mixture",
    "metrics",
    "mixtures",
    "preprocessors",
    "register_flan_mixtures",
    "register_flan_tasks",
    "sources",
    "tasks",
    "templates",
]

register_flan_tasks()
register_flan_mixtures()
