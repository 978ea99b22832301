"""JAX's persistent compilation cache, on by default for every moetx run.

A relaunched, resumed or repeated run compiles the same train and eval steps as before; with the
cache, XLA's executables are read back from disk instead of compiled again, so the time to the
first step drops to the time to load them. The key JAX files an executable under covers the
program, the compile options, the XLA flags, the backend and its devices, so a cached
executable is only ever the one that would have been compiled.

Where the cache lives, first match wins:
1. a directory JAX was already given (`JAX_COMPILATION_CACHE_DIR`, `jax.config`, or an earlier
   call in this process): it is kept, as are its size and compile-time settings;
2. `train.compilation_cache` set to a path in gin;
3. `$MOETX_COMPILATION_CACHE` (a path; `0`, `false`, `off` or `no` turns the cache off);
4. `$XDG_CACHE_HOME/moetx/jax_cache`, else `~/.cache/moetx/jax_cache` (beside moetx's data cache).

Only programs that took at least `min_compile_seconds` to compile are written (JAX's rule;
small helper programs are cheaper to compile than to read). The directory is bounded by
least-recently-used eviction (`DEFAULT_MAX_BYTES`); eviction also makes JAX take a file lock
around reads and writes, so several processes (workers, hosts of one machine) can share it.
"""

from __future__ import annotations

import os

ENV_VAR = "MOETX_COMPILATION_CACHE"
DEFAULT_MAX_BYTES = 4 << 30
_OFF = ("0", "false", "off", "no")


def default_dir() -> str:
    """`$XDG_CACHE_HOME/moetx/jax_cache`, else `~/.cache/moetx/jax_cache`."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "moetx", "jax_cache")


def enable(setting: bool | str | None = True, min_compile_seconds: float = 1.0,
           max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
    """Turns the persistent compilation cache on (see the module docstring for where).

    Args:
      setting: True for the default location, a directory, or False/None for no cache (unless
        JAX already has one, which is kept).
      min_compile_seconds: programs compiled faster than this are not written.
      max_bytes: the cache's size bound (least recently used entries are evicted).
    Returns:
      The cache directory in use, or None.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if setting is False or setting is None:
        return None
    if isinstance(setting, str):
        if not setting:
            raise ValueError("train.compilation_cache must be True, False or a directory, "
                             "got ''.")
        directory = setting
    else:
        env = os.environ.get(ENV_VAR, "").strip()
        if env.lower() in _OFF:
            return None
        directory = env or default_dir()
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        if isinstance(setting, str):  # asked for by name: say so
            raise ValueError(f"train.compilation_cache: cannot create {directory}: "
                             f"{e.strerror}.") from None
        return None  # the default location is a convenience; run without it
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    if jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    return directory
