"""Program search on the trainer: PyGlove spaces over moetx's own objects, regularized evolution
with hurdles and duplicate detection, and trials that are ordinary moetx training runs."""
