"""seq2slate through moetx's training entry point on the MSLR task: gin files, `train()`,
TensorBoard, checkpoints, and a run resumed from its checkpoint that ends exactly where an
uninterrupted one does."""

import gin
import jax
import pytest

from moetx.cli import flags as cli
from moetx.trainer import eval as eval_lib, train
from tests.conftest import event_tags

SMALL = ["--gin.HIDDEN_DIM=8", "--gin.TRAIN_SESSIONS_PER_QUERY=2",
         "--gin.TEST_SESSIONS_PER_QUERY=1", "--gin.BATCH_SIZE=16", "--gin.EVAL_STEPS=2",
         "--gin.EVAL_EVERY=0", "--gin.LOG_EVERY=1", "--gin.SAVE_EVERY=2", "--gin.WARMUP_STEPS=1",
         "--gin.LEARNING_RATE=1e-2", "--gin.CLICK_MODEL='diversity'",
         # The schedule of a 4-step run also for the run stopped at step 2.
         "--gin.warmup_cosine_schedule.decay_steps=4"]


def _train(model_gin: str, model_dir, steps: int, *extra: str) -> dict:
    gin.clear_config(clear_constants=False)
    args = cli.parse_flags([f"--gin_file=ranking/{model_gin}.gin", "--gin_file=ranking/mslr.gin",
                            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
                            *SMALL, *extra])
    cli.parse_gin(args)
    return train.train()


@pytest.fixture
def compilation_cache(tmp_path):
    """JAX's persistent compilation cache in `tmp_path` for the test: the commands of one test
    compile the same programs (init, train and eval steps, the checkpoint's slices); each
    program is compiled once and loaded by the later commands. Only saves time (a loaded
    executable is the compiled one); the previous settings are restored afterwards."""
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    for name, value in zip(names, (str(tmp_path / "jax_cache"), 0.0, -1)):
        jax.config.update(name, value)
    cc.reset_cache()
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()


@pytest.mark.usefixtures("clean_gin", "compilation_cache")
def test_reinforce_run_resumes_exactly(tmp_path, capsys):
    """REINFORCE with the moving-average baseline (model state in the checkpoint): 2 steps, then
    a second command that restores checkpoint_2 and runs to 4, evaluates exactly like 4 steps
    in one go; the eval command on the checkpoint (ranking/eval.gin) gives the same numbers."""
    reinforce = ["--gin.OBJECTIVE='reinforce'", "--gin.BASELINE='moving_average'"]
    straight = _train("seq2slate", tmp_path / "straight", 4, *reinforce)
    _train("seq2slate", tmp_path / "resumed", 2, *reinforce)
    capsys.readouterr()
    resumed = _train("seq2slate", tmp_path / "resumed", 4, *reinforce)
    assert "Restored checkpoint_2" in capsys.readouterr().err
    assert resumed["eval"] == straight["eval"]
    assert resumed["eval"]["slates"] == 32.0
    assert {"ndcg@5", "ndcg@10", "map", "mrr", "base_ndcg@10", "loss"} <= set(resumed["eval"])
    assert {"loss", "reward", "baseline", "timing/slates_per_second"} <= event_tags(
        tmp_path / "resumed" / "train")
    assert {"ndcg@10", "base_ndcg@10", "map", "mrr"} <= event_tags(tmp_path / "resumed" / "eval")
    assert (tmp_path / "resumed" / "checkpoint_4").exists()

    gin.clear_config(clear_constants=False)
    cli.parse_gin(cli.parse_flags([
        "--gin_file=ranking/seq2slate.gin", "--gin_file=ranking/mslr.gin",
        "--gin_file=ranking/eval.gin", f"--gin.CHECKPOINT_DIR='{tmp_path / 'resumed'}'",
        *SMALL, *reinforce]))
    again = eval_lib.evaluate()
    assert again["step"] == 4
    assert {k: again[k] for k in resumed["eval"]} == resumed["eval"]
