"""T5X's own gin files (verbatim copies in t5x_gin/, see its NOTICE) run unchanged in moetx:
every model + run file pair parses and builds its model; the T5.1.1 and Switch / ST-MoE files
give the published shapes; T5.1.1-small with T5X's pretrain.gin trains and its config.gin
parses again; finetune.gin continues a T5X checkpoint's step count; what moetx cannot do is
refused in one line naming the moetx equivalent."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys

import gin
import pytest

from moetx import compat
from moetx.compat import hook
from moetx.util import gin_files
from tests.conftest import count_params_from_shapes

GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "t5x_gin")
T5_MODELS = [f"t5x/examples/t5/t5_1_1/{size}.gin" for size in
             ("small", "base", "large", "xl", "xxl")]
T5_RUNS = [f"t5x/configs/runs/{run}.gin" for run in ("pretrain", "finetune", "eval", "infer")]
MOE_MODELS = [f"flaxformer/t5x/configs/moe/models/{name}.gin" for name in
              ("switch_base", "switch_large", "switch_xxl", "switch_c", "st_moe_base",
               "st_moe_xl", "st_moe_32b")]
MOE_RUNS = [f"t5x/contrib/moe/configs/runs/{run}.gin"
            for run in ("pretrain", "finetune", "eval", "infer")]
# Every macro some run file leaves %gin.REQUIRED (T5X's base.gin leaves DROPOUT_RATE to the run).
REQUIRED = ["MIXTURE_OR_TASK_NAME = 'moetx_en_span_corruption'",
            "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}", "TRAIN_STEPS = 3",
            "MODEL_DIR = '/nonexistent'", "DROPOUT_RATE = 0.0",
            "INITIAL_CHECKPOINT_PATH = '/nonexistent'", "CHECKPOINT_PATH = '/nonexistent'",
            "EVAL_OUTPUT_DIR = '/nonexistent'", "INFER_OUTPUT_DIR = '/nonexistent'"]
COMMAND = {"pretrain": "moetx-train", "finetune": "moetx-train", "eval": "moetx-eval",
           "infer": "moetx-infer"}
# A T5.1.1 of the T5X fixture's shapes (d_model 8, 4 heads of 3, d_ff 16, 2+2 layers).
TINY = ["--gin.network.T5Config.emb_dim=8", "--gin.network.T5Config.num_heads=4",
        "--gin.network.T5Config.head_dim=3", "--gin.network.T5Config.mlp_dim=16",
        "--gin.network.T5Config.num_encoder_layers=2",
        "--gin.network.T5Config.num_decoder_layers=2"]
T5X_FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures",
                           "t5x", "test_t5_tiny.checkpoint_0")


@pytest.fixture
def t5x_gin(clean_gin):
    """Parses T5X gin files through moetx (as `moetx.cli.flags.parse_gin` does) and returns
    the built model (`compat.t5x_model.T5XModel`)."""
    compat.activate()

    def parse(files, bindings=()):
        gin_files.parse_files(files, [*REQUIRED, *bindings], [GIN_DIR])
        return gin.query_parameter("%MODEL").scoped_configurable_fn()

    yield parse
    compat.deactivate()


def _pairs():
    return ([(m, r) for m in T5_MODELS for r in T5_RUNS]
            + [(m, r) for m in MOE_MODELS for r in MOE_RUNS])


@pytest.mark.parametrize("model_file,run_file", _pairs(),
                         ids=lambda p: p.split("/")[-1].removesuffix(".gin"))
def test_each_model_and_run_file_pair_parses_and_builds(t5x_gin, model_file, run_file):
    from moetx.lm import models

    built = t5x_gin([model_file, run_file])  # T5X's order: the model file, then the run
    assert isinstance(built.model, models.EncoderDecoderModel)
    assert not [n for n in gin_files.macro_names() if gin_files.is_required(n)]
    run = run_file.split("/")[-1].removesuffix(".gin")
    entry = compat.entry_point(COMMAND[run])
    assert entry is not None and entry.__name__ == {"moetx-train": "train",
                                                    "moetx-eval": "evaluate",
                                                    "moetx-infer": "infer"}[COMMAND[run]]


# T5.1.1 (Raffel et al.; the public t5-v1_1 checkpoints): d_model, heads, d_kv, d_ff, layers.
T5_1_1 = {"small": (512, 6, 64, 1024, 8), "base": (768, 12, 64, 2048, 12),
          "large": (1024, 16, 64, 2816, 24), "xl": (2048, 32, 64, 5120, 24),
          "xxl": (4096, 64, 64, 10240, 24)}


@pytest.mark.parametrize("size", sorted(T5_1_1))
def test_t5_1_1_files_give_the_published_shapes(t5x_gin, size):
    cfg = t5x_gin([f"t5x/examples/t5/t5_1_1/{size}.gin",
                   "t5x/configs/runs/pretrain.gin"]).model.config
    d, heads, d_kv, d_ff, layers = T5_1_1[size]
    assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (d, heads, d_kv, d_ff)
    assert cfg.num_encoder_layers == cfg.num_decoder_layers == layers
    assert (cfg.vocab_size, cfg.mlp_activations, cfg.logits_via_embedding, cfg.dtype) == (
        32128, ("gelu", "linear"), False, "bfloat16")
    assert cfg.moe is None and cfg.dropout_rate == 0.0


def test_t5_1_1_small_has_the_parameter_count_of_t5_v1_1_small(t5x_gin):
    model = t5x_gin([T5_MODELS[0], "t5x/configs/runs/pretrain.gin"]).model
    # google/t5-v1_1-small: 76,961,152 parameters (untied logits, vocab 32128).
    assert count_params_from_shapes(model) == 76_961_152


# flaxformer's MoE presets (REFERENCES: lm_moe_t5x.md, Appendix A): layers, d, heads, d_kv,
# d_ff, experts, sparse every k-th layer, top-k, CF train / eval, group, router z-loss,
# activations, tied logits, extra MLP, min capacity.
MOE = {
    "switch_base": (12, 768, 12, 64, 3072, 128, 2, 1, 1.25, 2.0, 8192, 0.0, ("relu",), True,
                    False, 4),
    "switch_large": (24, 1024, 16, 64, 4096, 128, 2, 1, 1.25, 2.0, 4096, 0.0, ("relu",), True,
                     False, 4),
    "switch_xxl": (24, 4096, 64, 64, 10240, 128, 2, 1, 1.25, 4.0, 4096, 0.0,
                   ("gelu", "linear"), False, False, 2),
    "switch_c": (15, 2080, 30, 64, 6144, 2048, 1, 1, 1.0, 2.0, 2048, 0.0, ("relu",), False,
                 False, 2),
    "st_moe_base": (12, 768, 12, 64, 2048, 16, 4, 2, 1.25, 2.0, 4096, 1e-4, ("gelu", "linear"),
                    False, True, 4),
    "st_moe_xl": (24, 2048, 32, 64, 5120, 16, 4, 2, 2.0, 4.0, 1024, 1e-4, ("gelu", "linear"),
                  False, True, 4),
    "st_moe_32b": (24, 5120, 64, 128, 20480, 64, 4, 2, 1.25, 2.0, 4096, 1e-3,
                   ("gelu", "linear"), False, True, 4),
}


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_files_give_the_published_switch_and_st_moe_shapes(t5x_gin, name):
    cfg = t5x_gin([f"flaxformer/t5x/configs/moe/models/{name}.gin",
                   "t5x/contrib/moe/configs/runs/pretrain.gin"]).model.config
    (layers, d, heads, d_kv, d_ff, experts, every, k, cf_train, cf_eval, group, z, acts, tied,
     extra, min_cap) = MOE[name]
    moe = cfg.moe
    assert cfg.encoder_moe is None  # the same routing in encoder and decoder (no BPR)
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (layers, layers)
    assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (d, heads, d_kv, d_ff)
    assert (moe.num_experts, moe.sparse_every, moe.num_selected_experts) == (experts, every, k)
    assert (moe.train_capacity_factor, moe.eval_capacity_factor) == (cf_train, cf_eval)
    assert (moe.group_size, moe.router_z_loss_factor, moe.aux_loss_factor) == (group, z, 0.01)
    assert (cfg.mlp_activations, cfg.logits_via_embedding) == (acts, tied)
    assert (moe.extra_mlp, moe.min_expert_capacity) == (extra, min_cap)
    assert (moe.router_type, moe.dispatch, moe.jitter_noise) == ("tokens_choose", "masked", 0.0)
    assert not moe.batch_prioritized_routing


def test_tokens_choose_bpr_in_the_encoder_only(t5x_gin):
    # tokens_choose_base.gin turns BPR on in the sparse encoder; decoders never use it.
    cfg = t5x_gin(["flaxformer/t5x/configs/moe/models/tokens_choose_base.gin",
                   "t5x/contrib/moe/configs/runs/pretrain.gin"]).model.config
    assert cfg.encoder_moe.batch_prioritized_routing and not cfg.moe.batch_prioritized_routing
    assert cfg.moe.sparse_every == cfg.encoder_moe.sparse_every == 4


def _train(argv, capsys):
    from moetx.cli import train

    rc = train.main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, default_vocab):
    """T5.1.1-small with T5X's pretrain.gin, shrunk on the command line, trained 3 steps by
    `python -m moetx.cli.train`'s main in this process: (model_dir, exit status, stderr)."""
    import io
    from contextlib import redirect_stderr

    from moetx.cli import train

    gin.clear_config(clear_constants=False)
    model_dir = tmp_path_factory.mktemp("t5x_pretrain") / "run"
    argv = ["--gin_search_paths=" + GIN_DIR, "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
            "--gin_file=t5x/configs/runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.MIXTURE_OR_TASK_NAME='moetx_en_span_corruption'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
            # T5X's own requirements for an uncached task and a model file without dropout:
            "--gin.USE_CACHED_TASKS=False", "--gin.DROPOUT_RATE=0.0",
            # size and steps only:
            "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=3", "--gin.train_script.train.eval_steps=1",
            *TINY]
    err = io.StringIO()
    with redirect_stderr(err):
        rc = train.main(argv)
    gin.clear_config(clear_constants=False)
    return model_dir, rc, err.getvalue()


# ~100 s on the shared 2-core machine (span-corruption pipelines and an 8-device compile): the
# one end-to-end run of a verbatim T5X model + run file pair in `make test`.
def test_small_pretrain_trains_and_its_config_gin_parses_again(pretrained, clean_gin):
    model_dir, rc, err = pretrained
    assert rc == 0, err
    assert "[train] step 3/3" in err
    assert (model_dir / "checkpoint_3").is_dir()
    text = (model_dir / "config.gin").read_text()
    assert "import __main__ as train_script" in text and "network.T5Config.emb_dim = 8" in text
    compat.activate()
    gin.parse_config_file(str(model_dir / "config.gin"))
    assert gin.query_parameter("%TRAIN_STEPS") == 3
    cfg = gin.query_parameter("%MODEL").scoped_configurable_fn().model.config
    assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (8, 4, 3, 16)
    compat.deactivate()


@pytest.mark.slow  # ~45 s more: the whole validation split
def test_t5x_eval_gin_evaluates_the_checkpoint(pretrained, tmp_path, capsys, clean_gin):
    from moetx.cli import eval as eval_cli

    model_dir, rc, _ = pretrained
    assert rc == 0
    out = tmp_path / "eval"
    argv = ["--gin_search_paths=" + GIN_DIR, "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
            "--gin_file=t5x/configs/runs/eval.gin",
            f"--gin.CHECKPOINT_PATH='{model_dir / 'checkpoint_3'}'",
            f"--gin.EVAL_OUTPUT_DIR='{out}'",
            "--gin.MIXTURE_OR_TASK_NAME='moetx_en_span_corruption'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.DROPOUT_RATE=0.0",
            # the bundled corpus has no 'test' split:
            "--gin.utils.DatasetConfig.split='validation'",
            "--gin.utils.DatasetConfig.batch_size=8", *TINY]
    assert eval_cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 3 and results["split"] == "validation"
    assert results["cross_ent_loss"] > 0


@pytest.mark.slow  # ~30 s more: decodes the whole validation split (1,733 examples)
def test_t5x_infer_gin_decodes_the_task_split(pretrained, tmp_path, capsys, clean_gin):
    from moetx.cli import infer as infer_cli

    model_dir, rc, _ = pretrained
    assert rc == 0
    out = tmp_path / "infer"
    argv = ["--gin_search_paths=" + GIN_DIR, "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
            "--gin_file=t5x/configs/runs/infer.gin",
            f"--gin.CHECKPOINT_PATH='{model_dir / 'checkpoint_3'}'",
            f"--gin.INFER_OUTPUT_DIR='{out}'",
            "--gin.MIXTURE_OR_TASK_NAME='moetx_en_span_corruption'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.DROPOUT_RATE=0.0",
            "--gin.utils.DatasetConfig.split='validation'",
            "--gin.utils.DatasetConfig.batch_size=64", *TINY]
    assert infer_cli.main(argv) == 0, capsys.readouterr().err
    inputs = (out / "moetx_en_span_corruption-validation-inputs.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in
            (out / "moetx_en_span_corruption-predict.jsonl").read_text().splitlines()]
    assert len(rows) == len(inputs) > 0
    assert rows[0]["prompt"] == json.loads(inputs[0])["inputs"] and "output" in rows[0]


# Another ~100 s training run on the shared 2-core machine; the pretrain test above covers the
# same command path, this one the restore hook.
@pytest.mark.slow
def test_finetune_from_a_t5x_checkpoint_continues_its_step_count(tmp_path, capsys, clean_gin,
                                                                 default_vocab):
    from moetx.convert import formats, restore

    if "continue_step" not in inspect.signature(restore.InitFromCheckpoint).parameters:
        pytest.skip("InitFromCheckpoint(continue_step=...) is not in this moetx yet")
    # The fixture T5X wrote is at step 0; the same checkpoint written by moetx's T5X writer at
    # step 5 shows the step carried over.
    ckpt = formats.read_t5x(T5X_FIXTURE, load_optimizer=False)
    source = formats.write_t5x(str(tmp_path / "pretrained" / "checkpoint_5"),
                               dataclasses.replace(ckpt, step=5))
    model_dir = tmp_path / "finetuned"
    argv = ["--gin_search_paths=" + GIN_DIR, "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
            "--gin_file=t5x/configs/runs/finetune.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.INITIAL_CHECKPOINT_PATH='{source}'",
            "--gin.MIXTURE_OR_TASK_NAME='moetx_en_span_corruption'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
            "--gin.USE_CACHED_TASKS=False",
            "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=7", "--gin.EVAL_STEPS=1", *TINY]
    rc, err = _train(argv, capsys)
    assert rc == 0, err
    assert "initialised from" in err and "[train] step 7/7" in err
    assert (model_dir / "checkpoint_7").is_dir()
    # Two steps were trained (6 and 7): the run started at the source's step 5.
    assert not (model_dir / "checkpoint_2").exists()


@pytest.mark.parametrize("binding,says", [
    ("--gin.adafactor.Adafactor.beta1=0.9", "make_optimizer.optimizer_fn = @adamw"),
    ("--gin.utils.create_learning_rate_scheduler.factors='constant * exotic_decay'",
     "moetx knows constant, linear_warmup"),
    ("--gin.EXPERT_MLP_DIM=4096", "moetx has one mlp_dim"),
    ("--gin.moe_architecture.SparseEncoder.sparse_layout='top'", "MoeConfig.sparse_every"),
    ("--gin.utils.RestoreCheckpointConfig.mode='all'", "moetx reads one checkpoint"),
])
def test_unsupported_settings_are_refused_in_one_line(tmp_path, capsys, clean_gin, binding,
                                                      says):
    argv = ["--gin_search_paths=" + GIN_DIR,
            "--gin_file=flaxformer/t5x/configs/moe/models/switch_base.gin",
            "--gin_file=t5x/contrib/moe/configs/runs/pretrain.gin",
            f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
            "--gin.MIXTURE_OR_TASK_NAME='moetx_en_span_corruption'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}", "--gin.TRAIN_STEPS=1",
            binding]
    rc, err = _train(argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith("moetx: error:")]
    assert rc == 2 and len(lines) == 1, err
    assert says in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_a_run_file_for_another_command_names_the_right_one(capsys, clean_gin):
    argv = ["--gin_search_paths=" + GIN_DIR, "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
            "--gin_file=t5x/configs/runs/eval.gin", *[f"--gin.{b.replace(' = ', '=')}"
                                                            for b in REQUIRED[:1]],
            "--gin.CHECKPOINT_PATH='/nonexistent'", "--gin.EVAL_OUTPUT_DIR='/nonexistent'",
            "--gin.DROPOUT_RATE=0.0"]
    rc, err = _train(argv, capsys)
    assert rc == 2 and "use python -m moetx.cli.eval" in err, err


def test_a_module_moetx_does_not_serve_fails_in_one_line(t5x_gin):
    with pytest.raises(ImportError, match="serves only .*t5x.models"):
        gin.parse_config("from __gin__ import dynamic_registration\n"
                         "from t5x import decoding\n")


def test_a_real_t5x_installation_is_never_shadowed(tmp_path, monkeypatch):
    package = tmp_path / "t5x"
    package.mkdir()
    (package / "__init__.py").write_text("REAL = True\n")
    compat.deactivate()
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert hook.activate() == ("flaxformer",)
        import t5x

        assert t5x.REAL
    finally:
        compat.deactivate()
        sys.modules.pop("t5x", None)
