"""One process of the multi-process test: trains a few steps on one global mesh.

Usage: python multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_JSON
The (data=2, expert=1, model=2) mesh spans the 4 CPU devices of all processes. Every process feeds
only its own rows of the same fixed global batch, as a real multi-host input pipeline does.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# The shared test helpers (importing the test conftest sets its own 8-device XLA_FLAGS, which the
# next line replaces before jax creates its backend).
from tests.conftest import TEST_XLA_FLAGS, make_trainer, packed_batch, tiny_model  # noqa: E402

# 4 devices in all: 2 per process with two processes, 4 in the single-process reference.
os.environ["XLA_FLAGS"] = (f"{TEST_XLA_FLAGS} "
                           f"--xla_force_host_platform_device_count={4 // int(sys.argv[2])}")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def main():
    port, nproc, pid, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    global_batch = packed_batch(8, 32, seed=7)
    # data=2 x model=2 over 4 devices: batch rows split across processes, model within.
    trainer = make_trainer(tiny_model(), (2, 1, 2), batch_size=8, devices=jax.devices())
    rows = trainer.local_rows(8)
    local = {k: v[rows] for k, v in global_batch.items()}
    state = trainer.init_state()
    losses = []
    for _ in range(3):
        state, sums = trainer.train_step(state, trainer.to_global(local))
        losses.append(float(sums["loss"]))
    with open(out, "w") as f:
        json.dump({"losses": losses, "rows": [rows.start, rows.stop],
                   "devices": jax.device_count(), "processes": jax.process_count()}, f)


if __name__ == "__main__":
    main()
