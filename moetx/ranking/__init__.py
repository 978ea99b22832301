"""The ranking track on moetx's trainer: seq2slate (Bello et al. 2018) re-ranks the slates a base
ranker proposes, trained from simulated clicks on a real learning-to-rank sample.

  networks.py    the pointer network (LSTM or Transformer encoder, LSTM pointer decoder with
                 glimpses) and the item scorer of the baselines
  decoding.py    which items are available at each step; teacher forcing, greedy decoding,
                 sampling and beam search over permutations
  objectives.py  the weak-supervision loss from clicks, REINFORCE, and the rax metrics
  slates.py      the protocol on the host: feature transform, base ranker, click models, padded
                 slates and their input checks
  tasks.py       SeqIO tasks over slates (the MSLR-WEB30K sample of `moetx.datasets.mslr`)
  model.py       the model wrappers (`Seq2SlateModel`, `ScoringRankerModel`) for the trainer

Run files: `gin/ranking/seq2slate.gin` or `gin/ranking/scorer.gin` with `gin/ranking/mslr.gin`
(training, `python -m moetx.cli.train`) and `gin/ranking/eval.gin` (`python -m moetx.cli.eval`).
"""
