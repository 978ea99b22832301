"""Experiment pipelines built from training runs called as a library: FLAN finetuning set-up
and evaluation (`flan_finetune`, `flan_eval`), STraTA task augmentation and self-training
(`strata`), and EfficientNetV2 progressive learning (`progressive`)."""
