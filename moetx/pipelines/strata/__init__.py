"""STraTA: self-training with task augmentation (Vu et al., EMNLP 2021), on moetx's trainer.

- `augment`: task augmentation. An NLI data generator (label + premise -> hypothesis) samples
  hypotheses (top-k) for unlabeled in-domain sentences of the target task; an NLI classifier keeps
  the consistent, confident ones; the result is a SeqIO task the auxiliary model is trained on.
- `selftrain`: the self-training loop (every iteration restarts from the auxiliary model; the
  top floor(dev_acc * N) hard pseudo-labels by confidence; early stopping with patience).
- `backend`: finetune with `moetx.trainer.train`, rank-classify / sample with
  `moetx.lm.predict.Predictor`, in process.
- `data`: TSV files of (inputs, targets) and the SeqIO tasks registered over them.
- `run`: the whole pipeline from gin, `python -m moetx.cli.strata --gin_file=...`.
"""
