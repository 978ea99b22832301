"""Starting a finetuning run from a pretrained checkpoint (copy, data position reset)."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from moetx.pipelines import flan_finetune as finetune


def test_init_model_dir_copies_and_upgrades(tmp_path):
    src = tmp_path / "pre" / "checkpoint_5"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(src / "state", {"step": np.int32(5), "params": {"w": np.ones(3)},
                                      "opt_state": {"v": np.zeros(3)}})
    checkpointer.wait_until_finished()
    os.makedirs(src / "dataset")
    (src / "dataset" / "metadata").write_text(json.dumps({"batches_consumed": 5}))

    dst = finetune.init_model_dir(str(src), str(tmp_path / "ft"))
    assert dst == str(tmp_path / "ft" / "checkpoint_5")
    assert json.loads((tmp_path / "ft" / "checkpoint_5" / "dataset" / "metadata").read_text()) \
        == {"batches_consumed": 0}
    tree = checkpointer.restore(os.path.join(dst, "state"))
    assert sorted(tree) == ["ema", "model_state", "opt_state", "params", "step"]
    np.testing.assert_array_equal(tree["params"]["w"], np.ones(3))
    assert int(tree["step"]) == 5
    # The source is untouched, and a directory with checkpoints is never overwritten.
    assert sorted(checkpointer.restore(str(src / "state"))) == ["opt_state", "params", "step"]
    with pytest.raises(ValueError, match="already has"):
        finetune.init_model_dir(str(src), str(tmp_path / "ft"))
    with pytest.raises(ValueError, match="not a moetx checkpoint"):
        finetune.init_model_dir(str(tmp_path / "pre"), str(tmp_path / "other"))
