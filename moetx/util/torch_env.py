"""Keep torch's optional triton import from crashing a process that already loaded TensorFlow.

With torch 2.14.1 (triton 3.8) and tensorflow 2.21 in one environment, loading triton's native
library after TensorFlow's segfaults the interpreter (seen here: `import tensorflow; import
triton` dies in `triton/knobs.py`; the other order works). torch imports triton lazily, e.g. when
transformers touches `torch.compiler`, so a conversion or parity run that has already read a
SeqIO task crashes. moetx runs torch on the CPU only (Hugging Face conversion and parity, timm
parity), where triton, a GPU kernel compiler, is never used: marking it unavailable is safe, and
torch's own `has_triton_package()` then answers False.
"""

from __future__ import annotations

import sys


def block_triton_after_tensorflow(force: bool = False) -> None:
    """Mark triton unimportable when TensorFlow is loaded (or `force`) and triton is not yet."""
    if "triton" in sys.modules:
        return
    if force or "tensorflow" in sys.modules:
        sys.modules["triton"] = None  # `import triton` now raises ImportError.


def import_torch():
    """`import torch`, after `block_triton_after_tensorflow()`."""
    block_triton_after_tensorflow()
    import torch

    return torch


def import_transformers():
    """`import transformers` (which imports torch), after `block_triton_after_tensorflow()`."""
    block_triton_after_tensorflow()
    import transformers

    return transformers
