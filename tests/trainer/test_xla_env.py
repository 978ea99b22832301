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
