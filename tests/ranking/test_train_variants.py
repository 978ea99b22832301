"""The other ranking models through the same run file and `train()`: the Transformer-encoder
variant of seq2slate with the weak-supervision loss, and the ApproxNDCG scorer baseline."""

import gin
import pytest

from moetx.cli import flags as cli
from moetx.trainer import train

SMALL = ["--gin.HIDDEN_DIM=8", "--gin.TRAIN_SESSIONS_PER_QUERY=2",
         "--gin.TEST_SESSIONS_PER_QUERY=1", "--gin.BATCH_SIZE=16", "--gin.EVAL_STEPS=2",
         "--gin.EVAL_EVERY=0", "--gin.LOG_EVERY=1", "--gin.WARMUP_STEPS=1"]


def _train(model_gin: str, model_dir, steps: int, *extra: str) -> dict:
    gin.clear_config(clear_constants=False)
    args = cli.parse_flags([f"--gin_file=ranking/{model_gin}.gin", "--gin_file=ranking/mslr.gin",
                            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
                            *SMALL, *extra])
    cli.parse_gin(args)
    return train.train()


@pytest.mark.usefixtures("clean_gin")
def test_weak_supervision_transformer_and_approx_ndcg_scorer_train(tmp_path):
    """Each trains 2 steps and evaluates NDCG on the same 32 test slates."""
    ws = _train("seq2slate", tmp_path / "ws", 2, "--gin.ENCODER='transformer'",
                "--gin.NUM_LAYERS=1", "--gin.MLP_DIM=16", "--gin.NUM_HEADS=2")
    assert ws["eval"]["slates"] == 32.0 and 0.0 < ws["eval"]["ndcg@10"] <= 1.0
    scorer = _train("scorer", tmp_path / "scorer", 2, "--gin.SCORER_LOSS='approx_ndcg'")
    assert 0.0 < scorer["eval"]["ndcg@10"] <= 1.0
    # Both see the same test slates: the base ranker's figures agree.
    assert scorer["eval"]["base_ndcg@10"] == ws["eval"]["base_ndcg@10"]
