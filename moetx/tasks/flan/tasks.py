"""SeqIO tasks of the FLAN mixture: offline datasets and TFDS-backed standard datasets.

Per dataset `<d>` (offline: `sources.DATASETS`; TFDS: `TFDS_DATASETS`):

- `flan_<d>`: every example formatted with one of the dataset's ten templates, round-robin
  (`preprocessors.batch_apply_template`), tokenized with the moetx vocabulary (8k pieces + 100
  sentinel ids, the vocabulary of the span-corruption checkpoints) plus EOS. Splits 'train'
  (first `train_cap` = 30,000 examples), 'validation' and 'test' (first `eval_cap` = 200, as in
  FLAN). Metrics: exact match and token F1 of generated targets.
- `flan_<d>_scoring` (classification datasets): the validation/test examples under the
  non-inverted templates that list the options, expanded into one row per option, for rank
  classification (`metrics.rank_classification`, a `(targets, scores)` metric).
- `flan_<d>_fewshot`, `flan_<d>_scoring_fewshot` (offline datasets): the same with up to 16
  train exemplars before each input, pruned to 960 tokens (`preprocessors.fewshot_examples`).

Nothing is read at registration: offline datasets are fetched/parsed on first read
(`sources.load_records`), and TFDS ones are `read_only` (never downloaded or prepared; tests
use `tfds.testing.mock_data`). `register_flan_tasks` re-registers with other caps.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from moetx.datasets import paths, vocab as vocab_lib
from moetx.tasks.flan import metrics, preprocessors, templates
from moetx.datasets import flan_sources as sources

__all__ = [
    "DEFAULT_EVAL_CAP",
    "DEFAULT_TRAIN_CAP",
    "OFFLINE_DATASETS",
    "TFDS_DATASETS",
    "OfflineSource",
    "classification_datasets",
    "normalize_offline",
    "register_flan_tasks",
    "task_name",
]

DEFAULT_TRAIN_CAP = 30_000
DEFAULT_EVAL_CAP = 200
FLAN_EXTRA_IDS = 100
OFFLINE_DATASETS = tuple(sources.DATASETS)

_NLI3_ANSWER = {"entailment": templates.NLI3_OPTIONS[0], "neutral": templates.NLI3_OPTIONS[1],
                "contradiction": templates.NLI3_OPTIONS[2]}


def normalize_offline(name: str, record: Mapping) -> dict:
    """A `sources` record -> the normalized record of `templates.FIELDS[name]` (+ options)."""
    if name in ("fortunes_topic", "language_id", "spam", "sotu_party"):
        return {"text": record["text"], "answer": record["label"],
                "options": list(sources.LABELS[name])}
    if name == "wordnet_nli":
        return {"premise": record["premise"], "hypothesis": record["hypothesis"],
                "answer": _NLI3_ANSWER[record["label"]], "options": list(templates.NLI3_OPTIONS)}
    if name == "wordnet_define":
        return {"definition": record["definition"], "pos": record["pos"], "word": record["word"],
                "answer": record["word"]}
    if name == "wordnet_antonyms":
        return {"word": record["word"], "antonym": record["antonym"],
                "answer": record["antonym"]}
    if name == "analogies":
        return {**{k: record[k] for k in "abcd"}, "relation": record["relation"].replace(
            "-", " "), "answer": record["d"]}
    if name == "trivia_qa":
        return {"question": record["question"], "category": record["category"],
                "answer": record["answer"]}
    raise ValueError(f"No normalizer for offline FLAN dataset {name!r}; expected one of "
                     f"{list(OFFLINE_DATASETS)}.")


def classification_datasets() -> list[str]:
    """Datasets (offline and TFDS) evaluated by rank classification."""
    return [*sources.LABELS, *TFDS_DATASETS]


def _columns(rows: Sequence[Mapping], keys: Sequence[str]) -> tf.data.Dataset:
    if not rows:
        raise ValueError("No examples to build a dataset from.")
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant([r[k] for r in rows], dtype=tf.string) for k in keys})


class OfflineSource(seqio.DataSource):
    """Normalized records of an offline dataset (or their few-shot versions), read lazily.

    Args:
      name: a `sources.DATASETS` name.
      caps: per split, how many records to keep (the first ones, in the dataset's order).
      data_dir: cache root (None: `$MOETX_DATA` or `~/.cache/moetx`).
      fewshot: None, or (templates, num_shots, token_budget, vocabulary) to emit few-shot
        'inputs'/'targets' instead of records.
    """

    def __init__(self, name: str, caps: Mapping[str, int], data_dir=None, fewshot=None):
        super().__init__(splits=tuple(caps), num_input_examples=None, caching_permitted=False)
        self.name = name
        self._caps = dict(caps)
        self._data_dir = data_dir
        self._fewshot = fewshot

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [f"{self.name}:{split}"]

    def records(self, split: str) -> list[dict]:
        if split not in self._caps:
            raise ValueError(f"FLAN dataset {self.name!r} has splits {list(self._caps)}, not "
                             f"{split!r}.")
        raw = sources.load_records(self.name, self._data_dir)[split][:self._caps[split]]
        return [normalize_offline(self.name, r) for r in raw]

    def rows(self, split: str) -> list[dict]:
        """What `get_dataset` yields, as Python dicts."""
        records = self.records(split)
        if self._fewshot is None:
            return records
        patterns, num_shots, budget, vocabulary = self._fewshot
        train = self.records("train")
        return preprocessors.fewshot_examples(
            records, train, patterns, lambda s: len(vocabulary.encode(s)), num_shots, budget)

    def num_input_examples(self, split: str) -> int:
        n = len(self.records(split))
        if self._fewshot:  # round-robin drops the last incomplete group of templates
            n -= n % len(self._fewshot[0])
        return n

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        rows = self.rows(split)
        keys = [k for k in rows[0] if k not in ("options", "template_idx", "num_shots")]
        ds = _columns(rows, keys)
        if "options" in rows[0]:
            options = tf.data.Dataset.from_tensor_slices(
                tf.constant([list(r["options"]) for r in rows], dtype=tf.string))
            ds = tf.data.Dataset.zip((ds, options)).map(lambda ex, o: {**ex, "options": o})
        if shard_info is not None:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        return ds


# ----------------------------------------------------------------------------- TFDS datasets


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """A standard FLAN dataset in TFDS.

    Attributes:
      tfds_name: TFDS name with config and version.
      splits: moetx split -> TFDS split ('validation' may be a TFDS 'test' when the dataset
        has no labeled validation split).
      template_key: key of `templates.PATTERNS`.
      fields: normalized field -> TFDS feature.
      answers: label index -> answer string (the `label_key` ClassLabel's order).
      options: the options as listed in the prompt (a permutation of `answers`).
      label_key: the TFDS label feature.
    """

    tfds_name: str
    splits: Mapping[str, str]
    template_key: str
    fields: Mapping[str, str]
    answers: tuple[str, ...]
    options: tuple[str, ...]
    label_key: str = "label"


_YN, _NY = ("yes", "no"), ("no", "yes")
_TV = {"train": "train", "validation": "validation"}
_TT = {"train": "train", "validation": "test"}
_PH = {"premise": "premise", "hypothesis": "hypothesis"}
_NLI3 = templates.NLI3_OPTIONS

TFDS_DATASETS: dict[str, TfdsSpec] = {
    "rte": TfdsSpec("super_glue/rte:1.0.2", _TV, "rte", _PH, _YN, _YN),
    **{f"anli_r{r}": TfdsSpec(f"anli/r{r}:0.1.0", _TV, "anli",
                              {"premise": "context", "hypothesis": "hypothesis"}, _NLI3, _NLI3)
       for r in (1, 2, 3)},
    "mnli_matched": TfdsSpec("glue/mnli:2.0.0", {"train": "train",
                                                 "validation": "validation_matched"},
                             "mnli", _PH, _NLI3, _NLI3),
    "mnli_mismatched": TfdsSpec("glue/mnli:2.0.0", {"train": "train",
                                                    "validation": "validation_mismatched"},
                                "mnli", _PH, _NLI3, _NLI3),
    "snli": TfdsSpec("snli:1.1.0", _TV, "snli", _PH, _NLI3, _NLI3),
    "cb": TfdsSpec("super_glue/cb:1.0.2", _TV, "cb", _PH, (_NLI3[0], _NLI3[2], _NLI3[1]), _NLI3),
    "wnli": TfdsSpec("glue/wnli:2.0.0", _TV, "wnli",
                     {"sentence1": "sentence1", "sentence2": "sentence2"}, _NY, _NY),
    "qnli": TfdsSpec("glue/qnli:2.0.0", _TV, "qnli",
                     {"question": "question", "sentence": "sentence"}, _YN, _YN),
    "boolq": TfdsSpec("super_glue/boolq:1.0.2", _TV, "boolq",
                      {"passage": "passage", "question": "question"}, _NY, _NY),
    "copa": TfdsSpec("super_glue/copa:1.0.2", _TV, "copa",
                     {"premise": "premise", "question": "question"}, (), ()),
    "sst2": TfdsSpec("glue/sst2:2.0.0", _TV, "sst2", {"sentence": "sentence"},
                     ("negative", "positive"), ("negative", "positive")),
    "imdb": TfdsSpec("imdb_reviews/plain_text:1.0.0", _TT, "imdb", {"text": "text"},
                     ("negative", "positive"), ("negative", "positive")),
    "yelp": TfdsSpec("yelp_polarity_reviews:0.2.0", _TT, "yelp", {"text": "text"},
                     ("negative", "positive"), ("negative", "positive")),
    "ag_news": TfdsSpec("ag_news_subset:1.0.0", _TT, "ag_news",
                        {"title": "title", "text": "description"},
                        ("World", "Sports", "Business", "Science/Tech"),
                        ("World", "Sports", "Business", "Science/Tech")),
    "trec": TfdsSpec("trec:1.0.0", _TT, "trec", {"question": "text"},
                     ("description", "entity", "abbreviation", "human", "numeric", "location"),
                     ("description", "entity", "abbreviation", "human", "numeric", "location"),
                     label_key="label-coarse"),
    "mrpc": TfdsSpec("glue/mrpc:2.0.0", _TV, "mrpc",
                     {"sentence1": "sentence1", "sentence2": "sentence2"}, _NY, _NY),
    "qqp": TfdsSpec("glue/qqp:2.0.0", _TV, "qqp",
                    {"question1": "question1", "question2": "question2"}, _NY, _NY),
    "cola": TfdsSpec("glue/cola:2.0.0", _TV, "cola", {"sentence": "sentence"}, _NY, _NY),
}


def normalize_tfds(dataset: tf.data.Dataset, spec: TfdsSpec) -> tf.data.Dataset:
    """TFDS examples -> normalized records (strings + 'options'); unlabeled (-1) dropped."""
    dataset = dataset.filter(lambda ex: ex[spec.label_key] >= 0)

    def fn(ex):
        out = {k: ex[v] for k, v in spec.fields.items()}
        label = tf.cast(ex[spec.label_key], tf.int32)
        if spec.template_key == "copa":
            options = tf.stack([ex["choice1"], ex["choice2"]])
            out["connector"] = tf.where(tf.equal(ex["question"], "cause"), "because", "so")
        else:
            options = tf.constant(spec.options)
            out["answer"] = tf.gather(tf.constant(spec.answers), label)
        if spec.template_key == "copa":
            out["answer"] = tf.gather(options, label)
        out["options"] = options
        return out

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ----------------------------------------------------------------------------- registration


def task_name(dataset: str, scoring: bool = False, fewshot: bool = False) -> str:
    return f"flan_{dataset}" + ("_scoring" if scoring else "") + ("_fewshot" if fewshot else "")


def _output_features(vocabulary) -> dict[str, seqio.Feature]:
    return {"inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
            "targets": seqio.Feature(vocabulary, add_eos=True)}


def _fn_name(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # seqio logs preprocessor names
    return fn


def _add(name: str, source, pre: list, vocabulary, scoring: bool) -> None:
    seqio.TaskRegistry.remove(name)
    steps = [*pre]
    if scoring:
        steps.append(preprocessors.rank_classification_rows)
    else:
        steps.append(functools.partial(preprocessors.select_features,
                                       keys=("inputs", "targets")))
    steps += [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    seqio.TaskRegistry.add(
        name, source=source, preprocessors=steps, output_features=_output_features(vocabulary),
        postprocess_fn=metrics.rank_classification_postprocessor if scoring else None,
        metric_fns=[metrics.rank_classification] if scoring else [metrics.generation_metrics])


@gin.configurable(module="moetx.tasks.flan")
def register_flan_tasks(train_cap: int = DEFAULT_TRAIN_CAP, eval_cap: int = DEFAULT_EVAL_CAP,
                        num_shots: int = preprocessors.DEFAULT_MAX_SHOTS,
                        token_budget: int = preprocessors.DEFAULT_TOKEN_BUDGET,
                        data_dir: str | os.PathLike | None = None) -> list[str]:
    """(Re-)registers every FLAN task; returns their names. Reads no data.

    Args:
      train_cap: examples kept per dataset's train split (FLAN: 30,000).
      eval_cap: examples kept per validation/test split (FLAN: 200).
      num_shots: exemplars per few-shot example (at most 16).
      token_budget: few-shot inputs are pruned to this many tokens (FLAN: 960).
      data_dir: cache root of the offline datasets and the vocabulary.
    """
    if train_cap < 1 or eval_cap < 1:
        raise ValueError(f"train_cap and eval_cap must be positive, got {train_cap}, "
                         f"{eval_cap}.")
    root = paths.data_dir(data_dir)
    vocabulary = vocab_lib.lazy_default_vocabulary(extra_ids=FLAN_EXTRA_IDS, data_dir=root)
    caps = {"train": train_cap, "validation": eval_cap, "test": eval_cap}
    names = []
    for d in OFFLINE_DATASETS:
        patterns = templates.PATTERNS[d]
        classification = d in sources.LABELS
        zero = OfflineSource(d, caps, root)
        apply_all = _fn_name(functools.partial(
            preprocessors.batch_apply_template, templates=patterns), "batch_apply_template")
        _add(task_name(d), zero, [apply_all], vocabulary, scoring=False)
        few = OfflineSource(d, caps, root, fewshot=(patterns, num_shots, token_budget,
                                                    vocabulary))
        _add(task_name(d, fewshot=True), few, [], vocabulary, scoring=False)
        names += [task_name(d), task_name(d, fewshot=True)]
        if classification:
            scoring = [patterns[i] for i in templates.scoring_templates(d)]
            apply_scoring = _fn_name(functools.partial(
                preprocessors.batch_apply_template, templates=scoring,
                passthrough=("options", "answer")), "batch_apply_template")
            _add(task_name(d, scoring=True), zero, [apply_scoring], vocabulary, scoring=True)
            few_scoring = OfflineSource(d, caps, root, fewshot=(scoring, num_shots,
                                                                token_budget, vocabulary))
            _add(task_name(d, scoring=True, fewshot=True), few_scoring, [], vocabulary,
                 scoring=True)
            names += [task_name(d, scoring=True), task_name(d, scoring=True, fewshot=True)]
    for d, spec in TFDS_DATASETS.items():
        splits = {"train": f"{spec.splits['train']}[:{train_cap}]",
                  "validation": f"{spec.splits['validation']}[:{eval_cap}]"}
        source = seqio.TfdsDataSource(tfds_name=spec.tfds_name, splits=splits, read_only=True)
        norm = _fn_name(functools.partial(normalize_tfds, spec=spec), f"normalize_{d}")
        patterns = templates.PATTERNS[spec.template_key]
        apply_all = _fn_name(functools.partial(
            preprocessors.batch_apply_template, templates=patterns), "batch_apply_template")
        _add(task_name(d), source, [norm, apply_all], vocabulary, scoring=False)
        scoring = [patterns[i] for i in templates.scoring_templates(spec.template_key)]
        apply_scoring = _fn_name(functools.partial(
            preprocessors.batch_apply_template, templates=scoring,
            passthrough=("options", "answer")), "batch_apply_template")
        _add(task_name(d, scoring=True), source, [norm, apply_scoring], vocabulary, scoring=True)
        names += [task_name(d), task_name(d, scoring=True)]
    return names
