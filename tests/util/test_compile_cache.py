"""The persistent compilation cache: where it goes, that a second process loads what the first
compiled, and that train() / evaluate() turn it on."""

import os
import subprocess
import sys

import pytest

from moetx.util import compile_cache

_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from moetx.util import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
setting = json.loads(sys.argv[1])
where = compile_cache.enable(setting, min_compile_seconds=0.0)
@jax.jit
def f(x):
    for _ in range(20):
        x = jnp.tanh(x @ x.T) + x
    return x
f(jnp.ones((32, 32))).block_until_ready()
print(json.dumps({"dir": where, "hits": len(hits),
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def _run(tmp_path, setting, **env_overrides):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", compile_cache.ENV_VAR,
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                        "JAX_COMPILATION_CACHE_MAX_SIZE")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    env.update(env_overrides)
    import json

    out = subprocess.run([sys.executable, "-c", _PROGRAM, json.dumps(setting)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_location_and_a_second_process_loads_the_first_ones_program(tmp_path):
    first = _run(tmp_path, True)
    assert first["dir"] == str(tmp_path / "xdg" / "moetx" / "jax_cache")
    assert first["hits"] == 0 and first["max_size"] == compile_cache.DEFAULT_MAX_BYTES
    assert any(name.endswith("-cache") for name in os.listdir(first["dir"]))
    second = _run(tmp_path, True)
    assert second["dir"] == first["dir"] and second["hits"] >= 1


@pytest.fixture
def jax_cache_config(monkeypatch, tmp_path):
    """JAX's cache settings cleared for the test and restored after it (nothing is compiled in
    between, so the process's own cache is untouched)."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_compilation_cache_max_size")
    saved = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_compilation_cache_max_size", -1)
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    yield jax.config
    for n, v in saved.items():
        jax.config.update(n, v)


def test_precedence_jax_setting_then_gin_path_then_environment(jax_cache_config, tmp_path,
                                                               monkeypatch):
    def fresh():
        jax_cache_config.update("jax_compilation_cache_dir", None)

    assert compile_cache.enable(str(tmp_path / "gin")) == str(tmp_path / "gin")
    # Once JAX has a directory (here the one just set), it is kept.
    assert compile_cache.enable(str(tmp_path / "other")) == str(tmp_path / "gin")
    fresh()
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.enable(str(tmp_path / "gin")) == str(tmp_path / "gin")
    fresh()
    assert compile_cache.enable(True) == str(tmp_path / "env")
    for off in ("off", "0", "False"):
        fresh()
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.enable(True) is None
        assert jax_cache_config.jax_compilation_cache_dir is None
    fresh()
    assert compile_cache.enable(False) is None
    monkeypatch.delenv(compile_cache.ENV_VAR)
    assert compile_cache.enable(True) == str(tmp_path / "xdg" / "moetx" / "jax_cache")
    assert jax_cache_config.jax_persistent_cache_min_compile_time_secs == 1.0


def test_an_unusable_directory_is_an_error_when_named_and_skipped_by_default(jax_cache_config,
                                                                             tmp_path,
                                                                             monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="train.compilation_cache: cannot create"):
        compile_cache.enable(str(blocker / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert compile_cache.enable(True) is None


class _Stop(Exception):
    pass


@pytest.mark.parametrize("entry", ["train", "eval"])
def test_train_and_evaluate_turn_the_cache_on_first(monkeypatch, entry):
    from moetx.trainer import eval as eval_lib, train as train_lib

    seen = []

    def fake_enable(setting):
        seen.append(setting)
        raise _Stop

    monkeypatch.setattr(compile_cache, "enable", fake_enable)
    with pytest.raises(_Stop):
        if entry == "train":
            train_lib.train(model=None, model_dir="unused", train_dataset_cfg=None,
                            train_steps=1)
        else:
            eval_lib.evaluate(model=None, checkpoint_dir="unused", dataset_cfg=None,
                              compilation_cache="/somewhere")
    assert seen == ([True] if entry == "train" else ["/somewhere"])
