"""seq2slate through moetx's training entry point on the MSLR task: gin files, `train()`,
TensorBoard, checkpoints, and a run resumed from its checkpoint that ends exactly where an
uninterrupted one does."""

import gin
import pytest

from moetx.cli import flags as cli
from moetx.trainer import eval as eval_lib, train
from tests.conftest import event_tags

SMALL = ["--gin.HIDDEN_DIM=8", "--gin.TRAIN_SESSIONS_PER_QUERY=2",
         "--gin.TEST_SESSIONS_PER_QUERY=1", "--gin.BATCH_SIZE=16", "--gin.EVAL_STEPS=2",
         "--gin.EVAL_EVERY=0", "--gin.LOG_EVERY=1", "--gin.SAVE_EVERY=3", "--gin.WARMUP_STEPS=1",
         "--gin.LEARNING_RATE=1e-2", "--gin.CLICK_MODEL='diversity'",
         # The schedule of a 6-step run also for the run stopped at step 3.
         "--gin.warmup_cosine_schedule.decay_steps=6"]


def _train(model_gin: str, model_dir, steps: int, *extra: str) -> dict:
    gin.clear_config(clear_constants=False)
    args = cli.parse_flags([f"--gin_file=ranking/{model_gin}.gin", "--gin_file=ranking/mslr.gin",
                            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
                            *SMALL, *extra])
    cli.parse_gin(args)
    return train.train()


@pytest.mark.usefixtures("clean_gin")
def test_reinforce_run_resumes_exactly(tmp_path, capsys):
    """REINFORCE with the moving-average baseline (model state in the checkpoint): 3 steps, then
    a second command that restores checkpoint_3 and runs to 6, evaluates exactly like 6 steps
    in one go; the eval command on the checkpoint (ranking/eval.gin) gives the same numbers."""
    reinforce = ["--gin.OBJECTIVE='reinforce'", "--gin.BASELINE='moving_average'"]
    straight = _train("seq2slate", tmp_path / "straight", 6, *reinforce)
    _train("seq2slate", tmp_path / "resumed", 3, *reinforce)
    capsys.readouterr()
    resumed = _train("seq2slate", tmp_path / "resumed", 6, *reinforce)
    assert "Restored checkpoint_3" in capsys.readouterr().err
    assert resumed["eval"] == straight["eval"]
    assert resumed["eval"]["slates"] == 32.0
    assert {"ndcg@5", "ndcg@10", "map", "mrr", "base_ndcg@10", "loss"} <= set(resumed["eval"])
    assert {"loss", "reward", "baseline", "slates_per_sec"} <= event_tags(
        tmp_path / "resumed" / "train")
    assert {"ndcg@10", "base_ndcg@10", "map", "mrr"} <= event_tags(tmp_path / "resumed" / "eval")
    assert (tmp_path / "resumed" / "checkpoint_6").exists()

    gin.clear_config(clear_constants=False)
    cli.parse_gin(cli.parse_flags([
        "--gin_file=ranking/seq2slate.gin", "--gin_file=ranking/mslr.gin",
        "--gin_file=ranking/eval.gin", f"--gin.CHECKPOINT_DIR='{tmp_path / 'resumed'}'",
        *SMALL, *reinforce]))
    again = eval_lib.evaluate()
    assert again["step"] == 6
    assert {k: again[k] for k in resumed["eval"]} == resumed["eval"]
