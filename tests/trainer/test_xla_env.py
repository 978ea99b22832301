"""The CPU process settings moetx's entry points make before JAX starts (the allocator), and
what they leave alone (the user's XLA_FLAGS, their own malloc settings)."""

import os
import subprocess
import sys

import pytest

from moetx.util import xla_env

_FAULTS = """
import resource, sys
import numpy as np
from moetx.util import xla_env
configured = xla_env.configure_cpu_allocator() if sys.argv[1] == "1" else False
a = np.ones(48 << 20, np.uint8); del a  # the first use maps the pages once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.ones(48 << 20, np.uint8); del a
print(configured, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

linux_x86_64 = pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"),
    reason="the allocator settings are made on Linux x86-64 only")


def _env_without_malloc_settings() -> dict[str, str]:
    """This environment without the variables that make `configure_cpu_allocator` stand aside
    (the test session sets MALLOC_ARENA_MAX) or opt out of it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")
            and k not in ("GLIBC_TUNABLES", xla_env.OPT_OUT_ENV)}


@linux_x86_64
def test_allocator_keeps_freed_large_blocks_so_repeated_steps_fault_no_new_pages():
    """A 48 MiB block freed and allocated again (as XLA's per-step buffers are) is served from
    the heap once the allocator is configured, instead of a fresh mmap whose pages fault in."""
    env = _env_without_malloc_settings()
    runs = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, flag], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        configured, faults = out.stdout.split()
        runs[flag] = (configured == "True", int(faults))
    assert runs["1"][0] and not runs["0"][0]
    # Unconfigured, every block is a fresh mmap (5,360 faults here for the ten blocks, with
    # transparent huge pages); configured, 1.
    assert runs["0"][1] > 500 and runs["0"][1] > 20 * (runs["1"][1] + 10)
    # A user's own malloc settings are left alone.
    out = subprocess.run([sys.executable, "-c", _FAULTS, "1"], capture_output=True, text=True,
                         env=dict(env, MALLOC_ARENA_MAX="2"), timeout=120)
    assert out.stdout.split()[0] == "False"


@linux_x86_64
@pytest.mark.parametrize("command", ["train", "convert"])
def test_every_command_sets_up_the_allocator_before_jax_and_leaves_xla_flags_alone(command):
    """Importing any `moetx.cli` command runs the one preamble (`moetx/cli/__init__.py`): the
    allocator keeps freed large blocks (few page faults on the repeated 48 MiB blocks), and the
    user's `XLA_FLAGS` reach XLA unchanged (no flag added: see xla_env's docstring for why
    `+eltwise` is no longer set)."""
    env = dict(_env_without_malloc_settings(),
               XLA_FLAGS="--xla_force_host_platform_device_count=3")
    # Argument "0": the snippet does not configure the allocator itself; the preamble must.
    code = (f"import moetx.cli.{command}, os\n" + _FAULTS
            + "import jax; print(os.environ['XLA_FLAGS']); print(jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code, "0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    faults_line, flags, count = out.stdout.strip().splitlines()[-3:]
    assert flags == "--xla_force_host_platform_device_count=3" and count == "3"
    assert int(faults_line.split()[1]) < 200, faults_line


# XLA's own defaults for the three settings the test session changes (tests/conftest.py).
XLA_DEFAULT_COMPILE = {"xla_backend_optimization_level": 3,
                       "xla_llvm_disable_expensive_passes": False,
                       "xla_cpu_use_fusion_emitters": True}


@pytest.mark.parametrize("config", [{}, {"position_embedding": "rope",
                                         "mlp_activations": ("silu", "linear")}])
def test_the_tests_cheap_compile_computes_what_the_default_compile_does(config):
    """The test session compiles at LLVM's lowest optimisation level, with XLA's older loop
    emitters (tests/conftest.py); a train step's loss and gradients from it equal those of
    XLA's default compile of the same program up to float rounding (measured at the lowest
    level alone: up to 2.7e-7 of the largest gradient, not bitwise equal)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moetx.lm import models, transformer
    from tests.conftest import TEST_XLA_FLAGS, TINY, packed_batch

    assert TEST_XLA_FLAGS in os.environ["XLA_FLAGS"]
    model = models.DecoderOnlyModel(transformer.TransformerConfig(**{**TINY, **config}),
                                    loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")
    batch = {k: jnp.asarray(v) for k, v in packed_batch(4, 16).items()}
    params = model.get_initial_variables(jax.random.PRNGKey(0),
                                         model.input_shapes(4, 16))["params"]

    weights, factor = model.loss_weights_and_factor(batch)

    def loss(p):
        return model.loss_fn(p, batch, None, weights, factor)[0]

    lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
    cheap = jax.tree.leaves(lowered.compile()(params))
    default = jax.tree.leaves(lowered.compile(XLA_DEFAULT_COMPILE)(params))
    scale = max(float(np.max(np.abs(x))) for x in default[1:])
    for a, b in zip(cheap, default):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)
