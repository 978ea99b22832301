"""XLA CPU defaults: only added, never overriding the user's flags, gated by version/arch."""

import os
import subprocess
import sys

import pytest

from moetx.util import xla_env

FLAG = "--xla_cpu_experimental_ynn_fusion_type=+eltwise"


def test_flags_are_appended_and_user_flags_win():
    assert xla_env.cpu_flags_to_add("", "0.10.2", "x86_64") == [FLAG]
    user = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
    assert xla_env.cpu_flags_to_add(user, "0.10.2", "x86_64") == []
    assert xla_env.cpu_flags_to_add("", "0.11.0", "x86_64") == []  # unchecked jaxlib
    assert xla_env.cpu_flags_to_add("", "0.10.2", "aarch64") == []


@pytest.mark.parametrize("command", ["train", "convert"])
def test_every_command_sets_flags_before_jax_and_keeps_existing_ones(command):
    """Importing any `moetx.cli` command runs the one preamble (`moetx/cli/__init__.py`) before
    anything imports jax."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    env.pop("MOETX_XLA_CPU_DEFAULTS", None)
    code = (f"import moetx.cli.{command}, os, jax; "
            "print(os.environ['XLA_FLAGS']); print(jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    flags, count = out.stdout.strip().splitlines()[-2:]
    assert "--xla_force_host_platform_device_count=3" in flags and count == "3"
    if xla_env.cpu_flags_to_add("", __import__("jaxlib").__version__):
        assert FLAG in flags


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


@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64"),
                    reason="the allocator settings are made on Linux x86-64 only")
def test_allocator_keeps_freed_large_blocks_so_repeated_steps_fault_no_new_pages():
    """A 48 MiB block freed and allocated again (as XLA's per-step buffers are) is served from
    the heap once the allocator is configured, instead of a fresh mmap whose pages fault in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
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


def test_init_compile_options_only_undo_the_flag_moetx_added():
    added = ("--xla_force_host_platform_device_count=8 "
             "--xla_cpu_experimental_ynn_fusion_type=+eltwise")
    options = xla_env.init_compile_options("cpu", added)
    assert options == {"xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE")}
    assert xla_env.init_compile_options("gpu", added) is None
    assert xla_env.init_compile_options("cpu", "--xla_force_host_platform_device_count=8") is None
    user = "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce"
    assert xla_env.init_compile_options("cpu", user) is None


def test_without_elementwise_fusion_is_the_same_undoing():
    added = "--xla_cpu_experimental_ynn_fusion_type=+eltwise"
    assert (xla_env.without_elementwise_fusion("cpu", added)
            == xla_env.init_compile_options("cpu", added) is not None)
    assert xla_env.without_elementwise_fusion("tpu", added) is None
    assert xla_env.without_elementwise_fusion("cpu", "") is None


def test_the_trainer_compiles_a_model_that_opts_out_without_elementwise_fusions():
    """`xla_cpu_elementwise_fusion = False` (the vision classifiers) compiles the train and eval
    steps with `without_elementwise_fusion()`: fewer YNNPACK fusions in the compiled step, the
    same loss and metrics; language models keep the default (no options)."""
    import dataclasses

    import jax
    import numpy as np

    from moetx.trainer import optimizers, partitioning, trainer as trainer_lib
    from moetx.vision import model as vision_model
    from tests.conftest import make_trainer, tiny_model

    if xla_env.without_elementwise_fusion() is None:
        pytest.skip("the tuned XLA CPU flag is not in effect here (another jaxlib or machine)")
    assert make_trainer(tiny_model()).compiler_options is None
    mesh = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((4, 8, 8, 3), np.float32),
             "label": rng.integers(0, 10, 4).astype(np.int32), "mask": np.ones(4, np.float32)}
    results = {}
    for fusion in (False, True):
        model = vision_model.ImageClassificationModel(model_name="tiny/s",
                                                      num_classes=10)
        if fusion:
            model = dataclasses.replace(model)
            object.__setattr__(model, "xla_cpu_elementwise_fusion", True)
        tr = trainer_lib.Trainer(
            model, lambda param_axes: optimizers.sgd_momentum(optimizers.constant_schedule(0.1)),
            mesh, partitioning.standard_logical_axis_rules(),
            model.input_shapes(4, {"image": (8, 8, 3)}), seed=0)
        assert (tr.compiler_options is None) == fusion
        fused = tr.lower_train_step().compile().as_text().count('"kind":"__ynn_fusion"')
        state, sums = tr.train_step(tr.init_state(), tr.to_global(batch))
        evals = tr._eval_step(state.params, state.model_state, tr.to_global(batch))
        results[fusion] = fused, jax.device_get((sums, evals))
    assert results[False][0] < results[True][0], (results[False][0], results[True][0])
    for a, b in zip(jax.tree.leaves(results[False][1]), jax.tree.leaves(results[True][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_an_initializer_compiled_with_them_plans_less_memory_for_the_same_values():
    import jax
    import jax.numpy as jnp
    import numpy as np

    if xla_env.init_compile_options() is None:
        pytest.skip("the tuned XLA CPU flag is not in effect here (another jaxlib or machine)")
    init = jax.nn.initializers.normal(1.0)
    lowered = jax.jit(lambda key: init(key, (2048, 512), jnp.float32)).lower(
        jax.random.PRNGKey(0))
    as_tuned, for_init = lowered.compile(), lowered.compile(xla_env.init_compile_options())
    temp = lambda c: c.memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(for_init) < temp(as_tuned) / 3, (temp(for_init), temp(as_tuned))
    a, b = (np.asarray(c(jax.random.PRNGKey(0))) for c in (as_tuned, for_init))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
