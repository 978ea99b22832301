"""Experiments: named arms of training runs (each its own model gin files and bindings) trained
over seeds at an equal budget of training FLOPs, with resumable runs, curves against steps,
FLOPs and wall time, mean and spread over seeds, speed-ups to equal loss, plots and a summary.

`experiment` (the definition and the FLOPs matching), `curves` (pure functions from a run's
scalars to its record, and the aggregation over seeds), `runner` (the loop and the outputs),
`plots`, `claims` (the README's table of the papers' claims, verdicts by fixed rules);
`python -m moetx.experiments.run` is the command.
"""
