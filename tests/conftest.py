"""Test-wide setup: 8 simulated CPU devices and quiet TensorFlow, set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The same XLA CPU defaults as the entry points, so tests run what users run.
from moetx.trainer import xla_env  # noqa: E402

xla_env.configure_cpu_defaults()

# Tests import TensorFlow (SeqIO) and torch (parity peers) in one process; triton must not load
# after TensorFlow (segfault), and torch on the CPU never needs it.
from moetx.tools import torch_env  # noqa: E402

torch_env.block_triton_after_tensorflow(force=True)

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def clean_gin():
    import gin

    gin.clear_config(clear_constants=False)
    yield
    gin.clear_config(clear_constants=False)
