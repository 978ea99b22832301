"""moetx: a JAX/Flax trainer for large sequence models in the T5X lineage."""

import os as _os

# Quiet TensorFlow (imported by SeqIO) unless the user asked otherwise.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
