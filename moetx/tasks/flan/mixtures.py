"""FLAN mixtures: all tasks, leave-one-cluster-out, their evaluation and few-shot variants.

Train mixtures mix examples-proportionally with a rate cap, as FLAN's
`seqio.mixing_rate_num_examples(maximum=3000)`: a task of n train examples (n already capped
at the per-dataset train cap, 30,000, by its source) gets rate min(n, 3000). For a collection
`<c>` ('offline': what runs here; 'tfds': the standard datasets; 'all': both):

- `flan_<c>_all`: every dataset's `flan_<d>` task.
- `flan_<c>_no_<cluster>`: every cluster but `<cluster>` (leave-one-cluster-out training).
- `flan_<c>_<cluster>_eval`: the held-out cluster's zero-shot evaluation tasks: rank
  classification (`flan_<d>_scoring`) for classification datasets, generation (`flan_<d>`)
  for the others. Eval mixtures are not sampled from (seqio.Evaluator runs each subtask).
- few-shot variants (offline datasets only): `flan_<c>_all_fewshot`,
  `flan_<c>_no_<cluster>_fewshot`, `flan_<c>_<cluster>_eval_fewshot`.

Rates are computed when a mixture is first read, so registration reads no data.
"""

from __future__ import annotations

import functools

import gin
import seqio

from moetx.tasks.flan import clusters as clusters_lib
from moetx.datasets import flan_sources as sources
from moetx.tasks.flan import tasks

__all__ = [
    "COLLECTIONS",
    "DEFAULT_MAX_RATE",
    "eval_tasks",
    "leave_one_out_mixture",
    "mixing_rate",
    "rate_num_examples",
    "register_flan_mixtures",
    "train_tasks",
]

DEFAULT_MAX_RATE = 3000
COLLECTIONS = {"offline": clusters_lib.OFFLINE_CLUSTERS, "tfds": clusters_lib.TFDS_CLUSTERS,
               "all": clusters_lib.ALL_CLUSTERS}


def mixing_rate(num_examples: int, train_cap: int = tasks.DEFAULT_TRAIN_CAP,
                maximum: int = DEFAULT_MAX_RATE) -> float:
    """min(min(n, train_cap), maximum): the examples-proportional rate with both caps."""
    return float(min(num_examples, train_cap, maximum))


def rate_num_examples(task: seqio.Task, maximum: int = DEFAULT_MAX_RATE) -> float:
    """SeqIO rate function: min(train examples of `task` (source-capped), maximum)."""
    n = task.num_input_examples("train")
    if n is None:
        raise ValueError(f"Task {task.name!r} does not know its number of train examples, so "
                         "it cannot be mixed examples-proportionally. Fix: give its source "
                         "num_input_examples, or use a fixed rate.")
    return float(min(n, maximum))


def _has_fewshot(dataset: str) -> bool:
    return dataset in sources.DATASETS


def train_tasks(clusters: dict[str, tuple[str, ...]], held_out: str | None = None,
                fewshot: bool = False) -> list[str]:
    """Train task names of every cluster except `held_out`."""
    if held_out is not None and held_out not in clusters:
        raise ValueError(f"Unknown cluster {held_out!r}; expected one of {sorted(clusters)}.")
    return [tasks.task_name(d, fewshot=fewshot) for c, members in clusters.items()
            if c != held_out for d in members if not fewshot or _has_fewshot(d)]


def eval_tasks(clusters: dict[str, tuple[str, ...]], cluster: str,
               fewshot: bool = False) -> list[str]:
    """Zero-/few-shot evaluation task names of `cluster`."""
    if cluster not in clusters:
        raise ValueError(f"Unknown cluster {cluster!r}; expected one of {sorted(clusters)}.")
    classification = set(tasks.classification_datasets())
    return [tasks.task_name(d, scoring=d in classification, fewshot=fewshot)
            for d in clusters[cluster] if not fewshot or _has_fewshot(d)]


def _add(name: str, task_names: list[str], rate) -> None:
    seqio.MixtureRegistry.remove(name)
    if task_names:
        seqio.MixtureRegistry.add(name, [(t, rate) for t in task_names] if callable(rate)
                                  else task_names, default_rate=None if callable(rate) else 1.0)


@gin.configurable(module="moetx.tasks.flan")
def register_flan_mixtures(maximum: int = DEFAULT_MAX_RATE) -> list[str]:
    """(Re-)registers every FLAN mixture with rate cap `maximum`; returns their names."""
    rate = functools.partial(rate_num_examples, maximum=maximum)
    names = []
    for collection, clusters in COLLECTIONS.items():
        prefix = f"flan_{collection}"
        for fewshot in (False, True):
            suffix = "_fewshot" if fewshot else ""
            entries = {f"{prefix}_all{suffix}": train_tasks(clusters, None, fewshot)}
            for cluster in clusters:
                entries[f"{prefix}_no_{cluster}{suffix}"] = train_tasks(clusters, cluster,
                                                                        fewshot)
            for name, members in entries.items():
                _add(name, members, rate)
                if members:
                    names.append(name)
            for cluster in clusters:
                name = f"{prefix}_{cluster}_eval{suffix}"
                members = eval_tasks(clusters, cluster, fewshot)
                _add(name, members, 1.0)
                if members:
                    names.append(name)
    return names


@gin.configurable(module="moetx.tasks.flan")
def leave_one_out_mixture(held_out: str, collection: str = "offline", fewshot: bool = False,
                          split: str = "train") -> str:
    """Name of the leave-`held_out`-out train mixture (split 'train') or of the held-out
    cluster's eval mixture (any other split), for gin: `@leave_one_out_mixture()`."""
    if collection not in COLLECTIONS:
        raise ValueError(f"Unknown collection {collection!r}; expected one of "
                         f"{sorted(COLLECTIONS)}.")
    if held_out not in COLLECTIONS[collection]:
        raise ValueError(f"Unknown cluster {held_out!r} in collection {collection!r}; expected "
                         f"one of {sorted(COLLECTIONS[collection])}.")
    suffix = "_fewshot" if fewshot else ""
    if split == "train":
        return f"flan_{collection}_no_{held_out}{suffix}"
    return f"flan_{collection}_{held_out}_eval{suffix}"
