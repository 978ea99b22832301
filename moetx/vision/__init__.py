"""The vision track on moetx's trainer: image/video classifiers, ALIGN-style dual encoders and
MuST multi-task students are model wrappers with a `loss_fn`, trained by `moetx.trainer.train`.

  models/        one module per model family; `models.create("family/variant", num_classes)`
  augment.py     on-device augmentation (resize, pad-crop, flip, RandAugment, mixup)
  data.py        offline image data (Fashion-MNIST from Debian, scikit-learn digits, digit clips)
  tasks.py       SeqIO tasks over that data, registered on import
  model.py       the classification wrapper (label smoothing, mixup, batch norm state)
  align.py       ALIGN-style image-text dual encoder with a symmetric contrastive loss
  must.py        MuST: teacher pseudo-labels, a label store, a multi-task student
  progressive.py EfficientNetV2 progressive learning: stages through the trainer
"""
