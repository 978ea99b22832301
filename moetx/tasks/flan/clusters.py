"""Task clusters of the FLAN mixtures (leave-one-cluster-out holds out a whole cluster).

Offline clusters group moetx's registry-built datasets by task type; TFDS clusters follow the
FLAN paper's grouping of the standard datasets (NLI, sentiment, paraphrase, reading
comprehension, commonsense) plus moetx's `topic_classification` and `misc` for AG News, TREC
and CoLA. A cluster name may appear in both (NLI); `ALL_CLUSTERS` merges them.
"""

from __future__ import annotations

__all__ = ["ALL_CLUSTERS", "OFFLINE_CLUSTERS", "TFDS_CLUSTERS", "cluster_of"]

OFFLINE_CLUSTERS: dict[str, tuple[str, ...]] = {
    "nli": ("wordnet_nli",),
    "text_classification": ("fortunes_topic", "spam", "sotu_party"),
    "language_id": ("language_id",),
    "word_knowledge": ("wordnet_define", "wordnet_antonyms", "analogies"),
    "closed_book_qa": ("trivia_qa",),
}

TFDS_CLUSTERS: dict[str, tuple[str, ...]] = {
    "nli": ("anli_r1", "anli_r2", "anli_r3", "cb", "mnli_matched", "mnli_mismatched", "qnli",
            "rte", "snli", "wnli"),
    "sentiment": ("imdb", "sst2", "yelp"),
    "paraphrase": ("mrpc", "qqp"),
    "reading_comprehension": ("boolq",),
    "commonsense": ("copa",),
    "topic_classification": ("ag_news",),
    "misc": ("trec", "cola"),
}

ALL_CLUSTERS: dict[str, tuple[str, ...]] = {
    c: tuple(OFFLINE_CLUSTERS.get(c, ()) + TFDS_CLUSTERS.get(c, ()))
    for c in dict.fromkeys([*OFFLINE_CLUSTERS, *TFDS_CLUSTERS])
}


def cluster_of(dataset: str) -> str:
    """The cluster a dataset belongs to (ValueError for an unknown dataset)."""
    for cluster, members in ALL_CLUSTERS.items():
        if dataset in members:
            return cluster
    raise ValueError(f"Dataset {dataset!r} is in no FLAN cluster; known: "
                     f"{sorted(d for m in ALL_CLUSTERS.values() for d in m)}.")
