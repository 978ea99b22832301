"""The platform a trace is for: JAX's backend unless `trace_for` set another."""

import jax
import pytest

from moetx.util import platform as platform_lib


def test_trace_for_sets_the_traced_platform_while_open_and_rejects_unknown_names():
    assert platform_lib.traced_platform() == jax.default_backend() == "cpu"
    with platform_lib.trace_for("tpu"):
        assert platform_lib.traced_platform() == "tpu"
        with platform_lib.trace_for(None):  # None: JAX's default backend again
            assert platform_lib.traced_platform() == "cpu"
        assert platform_lib.traced_platform() == "tpu"
    assert platform_lib.traced_platform() == "cpu"
    with pytest.raises(ValueError, match="'cpu', 'gpu', 'tpu'"):
        with platform_lib.trace_for("TPU v4"):
            pass
