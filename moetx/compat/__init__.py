"""Running T5X's own gin files unchanged: T5X and flaxformer configurable names served by moetx.

A T5X gin file names its configurables through Python imports (`from __gin__ import
dynamic_registration`, `from t5x import utils`, `import __main__ as train_script`), so it
fails on its first line where no `t5x` package exists. This package makes those names
importable and maps what they configure onto moetx:

    T5X / flaxformer name                           moetx
    t5x.examples.t5.network.T5Config, Transformer   moetx.lm.transformer.TransformerConfig
    t5x.models.EncoderDecoderModel,                 moetx.lm.models.EncoderDecoderModel
      t5x.contrib.moe.models.MoeEncoderDecoderModel   (+ moetx.moe.layers.MoeConfig)
    flaxformer moe_architecture / moe_layers /      TransformerConfig + MoeConfig
      routing / dense / embedding / ... (the
      flaxformer MoE model gins)
    t5x.adafactor.Adafactor                         moetx.trainer.optimizers.adafactor
    t5x.utils.create_learning_rate_scheduler        a schedule (T5X's factor language)
    t5x.utils.DatasetConfig                         moetx.trainer.data.DatasetConfig
    t5x.utils.{Save,Restore,}CheckpointConfig       train(save_every, keep_checkpoints,
                                                      init_from=InitFromCheckpoint(...))
    t5x.partitioning.PjitPartitioner,               moetx.trainer.partitioning.make_mesh and
      t5x.contrib.moe.partitioning.MoePjitPartitioner standard_logical_axis_rules
    t5x.trainer.Trainer, contrib.moe MoeTrainer     num_microbatches, the learning rate
    __main__.train / evaluate / infer               moetx.trainer.train.train,
                                                      moetx.trainer.eval.evaluate,
                                                      moetx.lm.infer.infer

How: an import hook (`hook.activate`, a `sys.meta_path` finder) serves the modules `t5x.*`
and `flaxformer.*` from the tables in `hook.MODULES`, and gives the running `__main__` module
the T5X script functions `train`, `evaluate` and `infer` it lacks (T5X's run files configure
`__main__.train`, i.e. whatever script runs). The alternative, rewriting the module names in
the gin text while gin parses it, was rejected: gin has no public hook for the text of a file
or an `include`, command-line bindings (`--gin.network.T5Config.emb_dim=32`) would need the
same rewriting, and the operative `config.gin` a run writes would then name moetx modules a
T5X user does not recognise. With the hook, the configurables are registered under their T5X
names, so T5X's selectors, scopes and bindings work as written and `config.gin` reads like
T5X's. The hook serves a root only where no real one is importable (`t5x`, `flaxformer` are
looked up first), so an installed T5X or flaxformer is never shadowed; with a real T5X
installed, its own classes are configured and moetx refuses them in one line.

What moetx cannot do is refused with one line naming the moetx equivalent (`CompatError`, a
ValueError): a setting that changes what is trained or how (a flaxformer option moetx lacks,
an unknown schedule factor, a checkpoint mode). Differences that change no trained value are
announced in a `moetx: warning:` line instead: a model vocabulary other than the task's (T5X
refuses the pair; moetx trains on the task's ids), inference evaluation skipped for a task
without metric functions (as T5X's seqio.Evaluator does), decoding in float32 where T5X's
infer.gin restores bfloat16. Initialisers named by flaxformer gins are not read: moetx's
layers use their own (T5X-style) initialisers. T5X's `RANDOM_SEED = None` (a fresh seed per
run) is seed 0 here, so runs repeat.

T5X's order of files applies: the model file, then the run file (a run file sets macros the
model file leaves `%gin.REQUIRED`, such as finetune.gin's DROPOUT_RATE). Command-line
bindings name configurables as T5X's do (`--gin.network.T5Config.emb_dim=32`,
`--gin.utils.SaveCheckpointConfig.period=10`); where moetx has a configurable of the same
short name the T5X one needs its package (`--gin.t5x.models.EncoderDecoderModel.z_loss=...`),
and T5X's `train` is `--gin.train_script.train.eval_steps=...` (the run file's alias).

The commands activate this in `moetx.cli.flags.parse_gin`; a program parsing T5X gin files
through moetx as a library calls `activate()` first (see `tests/compat/`).
"""

from moetx.compat.errors import CompatError
from moetx.compat.hook import activate, deactivate, entry_point

__all__ = ["CompatError", "activate", "deactivate", "entry_point"]
