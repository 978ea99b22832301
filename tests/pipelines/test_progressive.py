"""Progressive learning: each stage is one trainer run with the stage's image size and
regularisation, resuming from the previous stage's checkpoint (model, optimizer, batch norm
state, EMA and data position)."""

import json

import gin
import pytest

from moetx.trainer import checkpoints
from moetx.cli import flags as cli
from moetx.trainer import train as train_lib
from moetx.vision import augment
from moetx.pipelines import progressive
from moetx.vision import model as vision_model


def test_stage_model_raises_size_and_regularisation_together():
    base = vision_model.ImageClassificationModel(
        model_name="tiny/s", augment=augment.Augment(crop_padding=1))
    stage = progressive.Stage(image_size=12, randaug_magnitude=7.5, mixup_alpha=0.2,
                              dropout=0.1, steps=5)
    m = progressive.stage_model(base, stage)
    assert (m.image_size, m.mixup_alpha, m.dropout_rate) == (12, 0.2, 0.1)
    assert m.module.dropout_rate == 0.1
    assert m.augment == augment.Augment(crop_padding=1, randaugment_layers=2,
                                        randaugment_magnitude=7.5)
    # EfficientNetV2-S's own rule (the CNN helper's schedule) ends at 300 in 4 stages.
    sizes = [s.image_size for s in progressive.efficientnet_v2_schedule(400)]
    assert sizes == [171, 214, 257, 300]


@pytest.mark.usefixtures("clean_gin")
def test_stages_resume_from_each_other(tmp_path, capsys):
    cli.parse_gin(cli.parse_flags([
        "--gin_file=vision/digits.gin", f"--gin.MODEL_DIR='{tmp_path}'",
        "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=16", "--gin.EVAL_STEPS=1",
        "--gin.LOG_EVERY=3", "--gin.WARMUP_STEPS=2", "--gin.SAVE_EVERY=100"]))
    calls = []

    def spy(model, train_steps):
        calls.append((model, train_steps))
        return train_lib.train(model=model, train_steps=train_steps)

    # (Two RandAugment ops keep the compile short.)
    base = vision_model.ImageClassificationModel(
        model_name="tiny/s", augment=augment.Augment(randaugment_ops=("rotate", "contrast")))
    stages = [(6, 5.0, 0.0, 0.0, 2), (8, 10.0, 0.2, 0.1, 4)]
    results = progressive.run(model=base, train_steps=6, stages=stages, train_fn=spy)
    err = capsys.readouterr().err

    assert [c[1] for c in calls] == [2, 6]
    assert [(m.image_size, m.augment.randaugment_magnitude, m.mixup_alpha, m.dropout_rate)
            for m, _ in calls] == [(6, 5.0, 0.0, 0.0), (8, 10.0, 0.2, 0.1)]
    assert [r["step"] for r in results] == [2, 6]
    assert results[1]["stage"]["image_size"] == 8
    # Stage 2 restored stage 1's final checkpoint and carried on the data position.
    assert "Restored checkpoint_2" in err
    assert checkpoints.latest_step(str(tmp_path)) == 6
    data_state = json.loads((tmp_path / "checkpoint_6" / "dataset" / "metadata").read_text())
    assert data_state == {"batches_consumed": 6}
    with pytest.raises(ValueError, match="sum to TRAIN_STEPS"):
        progressive.run(model=base, train_steps=7, stages=stages, train_fn=spy)
    assert gin.query_parameter("%TRAIN_STEPS") == 6
