"""Divergence: what a run does when its loss stops being finite or spikes.

`train()`'s `divergence_policy` chooses:

* `'stop'` (the default): a non-finite loss ends the run with an error;
* `'skip'`: the train step drops an update whose loss or gradient is not finite (the trainer's
  `skip_nonfinite_updates`), counts it, and the run stops after too many in a row;
* `'rewind'`: the run goes back to the newest intact checkpoint before the bad step and goes on
  from there with the data that follows the bad step, skipping `rewind_skip_batches` more
  batches: the batches seen between that checkpoint and the bad step are not replayed. This is
  the remedy PaLM used for loss spikes, where a spike came from a particular combination of
  parameters and data batches, and replaying the run from an earlier state on other data did
  not spike again.

`Monitor` watches every step's loss and gradient norm: a non-finite value, or (with a spike
factor) a loss above `spike_factor` times the mean of the last `spike_window` finite losses, is
reported as `Diverged`. Under `'stop'` that ends the run; under `'rewind'` it triggers a
rewind. Spike detection needs one of those two policies: a step that already updated the
parameters cannot be skipped afterwards.
"""

from __future__ import annotations

import collections
import math

POLICIES = ("stop", "skip", "rewind")


class Diverged(Exception):
    """Step `step`'s loss or gradient norm was not finite, or its loss spiked."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"step {step}: {reason}")
        self.step = step
        self.reason = reason


def check_policy(policy: str, spike_factor: float | None, spike_window: int,
                 rewind_skip_batches: int, max_rewinds: int) -> None:
    """Raises ValueError naming the setting when the divergence settings do not make sense."""
    if policy not in POLICIES:
        raise ValueError(f"train.divergence_policy must be one of {', '.join(POLICIES)}; got "
                         f"{policy!r}.")
    if spike_factor is not None:
        if not spike_factor > 1:
            raise ValueError(f"train.spike_factor must be above 1 (a loss this many times its "
                             f"running mean is a spike) or None; got {spike_factor!r}.")
        if policy == "skip":
            raise ValueError("train.spike_factor needs train.divergence_policy = 'stop' or "
                             "'rewind': a spiking update has already been applied when its "
                             "loss is seen, so 'skip' cannot drop it.")
    if spike_window < 1:
        raise ValueError(f"train.spike_window must be >= 1, got {spike_window}.")
    if rewind_skip_batches < 0:
        raise ValueError(f"train.rewind_skip_batches must be >= 0, got {rewind_skip_batches}.")
    if max_rewinds < 1:
        raise ValueError(f"train.max_rewinds must be >= 1, got {max_rewinds}.")


class Monitor:
    """Checks each finished step's loss and gradient norm (see the module docstring)."""

    def __init__(self, spike_factor: float | None = None, spike_window: int = 100):
        self.spike_factor = spike_factor
        self.spike_window = spike_window
        self._recent: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=spike_window)

    def observe(self, step: int, loss: float, grad_norm: float) -> None:
        """Records step `step`; raises `Diverged` when it is bad."""
        if not math.isfinite(loss):
            raise Diverged(step, f"the loss is {loss}")
        if not math.isfinite(grad_norm):
            raise Diverged(step, f"the gradient norm is {grad_norm}")
        if self.spike_factor is not None and len(self._recent) == self.spike_window:
            mean = sum(v for _, v in self._recent) / len(self._recent)
            if loss > self.spike_factor * mean:
                raise Diverged(step, f"the loss spiked to {loss:.4g}, over {self.spike_factor:g}"
                                     f" times its mean of the last {self.spike_window} steps "
                                     f"({mean:.4g})")
        self._recent.append((step, loss))

    def forget_after(self, step: int) -> None:
        """Drops the losses of steps after `step` (the run went back to `step`)."""
        kept = [(s, v) for s, v in self._recent if s <= step]
        self._recent.clear()
        self._recent.extend(kept)
