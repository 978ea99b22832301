"""T5X's run-file names: `utils.DatasetConfig`, the checkpoint configs, the learning-rate
scheduler, the partitioners and the trainer classes, as records the T5X script functions
(`scripts`) map onto `moetx.trainer` (data, partitioning, optimizers, train)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

from moetx.compat.errors import CompatError, refuse


# ---------------------------------------------------------------------------- data / ckpt
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """T5X's `utils.DatasetConfig` (same fields); `to_moetx` gives moetx's DatasetConfig."""

    mixture_or_task_name: Any = None
    task_feature_lengths: Mapping[str, int] | None = None
    split: str = "train"
    batch_size: int = 8
    shuffle: bool = True
    seed: int | None = None
    use_cached: bool = False
    pack: bool = False
    use_custom_packing_ops: bool = False
    module: str | None = None
    use_memory_cache: bool = True
    trim_output_features: bool = True
    runtime_preprocessors: Sequence[Any] | None = None
    num_prefetch_threads: int | None = None
    num_workers: int | None = 0

    def to_moetx(self, what: str = "utils.DatasetConfig"):
        """`moetx.trainer.data.DatasetConfig` (imports `module` first, as T5X does)."""
        from moetx.trainer import data

        if self.module:
            import importlib

            importlib.import_module(self.module)
        if self.runtime_preprocessors:
            raise refuse(f"{what}.runtime_preprocessors",
                         "put the preprocessors in the SeqIO task (moetx/tasks/)")
        if not self.trim_output_features:
            raise refuse(f"{what}.trim_output_features = False",
                         "moetx trims every feature to TASK_FEATURE_LENGTHS")
        if self.task_feature_lengths is None:
            raise CompatError(f"{what}.task_feature_lengths is None (T5X then uses the longest "
                              f"example); moetx needs fixed lengths: set "
                              f"--gin.TASK_FEATURE_LENGTHS=\"{{'inputs': 512, 'targets': 114}}\".")
        name = self.mixture_or_task_name
        name = getattr(name, "name", name)  # a seqio.Task / Mixture object
        return data.DatasetConfig(
            mixture_or_task_name=name, task_feature_lengths=dict(self.task_feature_lengths),
            split=self.split, batch_size=self.batch_size, shuffle=self.shuffle,
            seed=self.seed, pack=self.pack, use_cached=self.use_cached)


@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
    """T5X's `utils.SaveCheckpointConfig` -> train(save_every, keep_checkpoints). moetx
    always saves the data position (T5X's `save_dataset`), as a count of batches."""

    dtype: str = "float32"
    period: int | None = None
    checkpoint_steps: Sequence[int] | None = None
    keep: int | None = None
    keep_dataset_checkpoints: int | None = None
    save_dataset: bool = False
    checkpointer_cls: Any = None
    state_transformation_fns: Sequence[Any] = ()
    checkpoint_manager_cls: Any = None

    def __post_init__(self):
        if self.dtype not in ("float32", None):
            raise refuse(f"utils.SaveCheckpointConfig.dtype = {self.dtype!r}",
                         "moetx saves parameters in their own dtype (float32)")
        if self.checkpoint_steps:
            raise refuse("utils.SaveCheckpointConfig.checkpoint_steps",
                         "moetx saves every train.save_every steps "
                         "(utils.SaveCheckpointConfig.period)")
        for name in ("checkpointer_cls", "checkpoint_manager_cls"):
            if getattr(self, name) is not None:
                raise refuse(f"utils.SaveCheckpointConfig.{name}",
                             "moetx writes its own Orbax checkpoints (moetx.trainer.checkpoints)")
        if self.state_transformation_fns:
            raise refuse("utils.SaveCheckpointConfig.state_transformation_fns",
                         "convert checkpoints with python -m moetx.cli.convert")


@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
    """T5X's `utils.RestoreCheckpointConfig`: where a run starts from (training) or which
    checkpoint is read (eval, infer)."""

    path: Any = None
    mode: str = "latest"
    assignment_map: Sequence[tuple[str, str | None]] | None = None
    strict: bool = True
    fallback_to_scratch: bool = False
    dtype: str | None = None
    restore_dataset: bool = False
    checkpointer_cls: Any = None
    state_transformation_fns: Sequence[Any] = ()
    checkpoint_manager_cls: Any = None

    def __post_init__(self):
        if self.mode not in ("latest", "specific"):
            raise refuse(f"utils.RestoreCheckpointConfig.mode = {self.mode!r}",
                         "moetx reads one checkpoint: mode 'specific' (a checkpoint_<step> "
                         "directory) or 'latest' (a model directory's newest)")
        if self.fallback_to_scratch:
            raise refuse("utils.RestoreCheckpointConfig.fallback_to_scratch",
                         "InitFromCheckpoint(strict=False) keeps the fresh initialisation of "
                         "what the checkpoint lacks")
        for name in ("checkpointer_cls", "checkpoint_manager_cls"):
            if getattr(self, name) is not None:
                raise refuse(f"utils.RestoreCheckpointConfig.{name}",
                             "moetx reads T5X and moetx checkpoints itself (moetx.convert)")
        if self.state_transformation_fns:
            raise refuse("utils.RestoreCheckpointConfig.state_transformation_fns",
                         "use InitFromCheckpoint.assignment_map")

    @property
    def paths(self) -> list[str]:
        if self.path is None:
            return []
        return [self.path] if isinstance(self.path, str) else list(self.path)

    def single_path(self, what: str) -> str | None:
        paths = self.paths
        if len(paths) > 1:
            raise refuse(f"several utils.RestoreCheckpointConfig.path entries ({paths})",
                         f"{what} reads one checkpoint")
        return paths[0] if paths else None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """T5X's `utils.CheckpointConfig(save, restore)`."""

    save: SaveCheckpointConfig | None = None
    restore: RestoreCheckpointConfig | None = None


# ----------------------------------------------------------------------- learning rate
_FACTORS = ("constant", "linear_warmup", "linear_decay", "rsqrt_decay",
            "rsqrt_normalized_decay", "decay_every", "cosine_decay")


def create_learning_rate_scheduler(
        factors: str = "constant * linear_warmup * rsqrt_decay",
        base_learning_rate: float = 0.5, warmup_steps: int = 1000, decay_factor: float = 0.5,
        steps_per_decay: int = 20000, steps_per_cycle: int = 100000, step_offset: int = 0,
        min_learning_rate: float = 1e-8) -> Callable:
    """T5X's factor language for learning rates: the product of the named factors (T5X's
    meanings), floored at `min_learning_rate`. Returns a jnp schedule `step -> lr`."""
    names = [n.strip() for n in factors.split("*")]
    for name in names:
        if name not in _FACTORS:
            raise refuse(f"learning-rate factor {name!r}",
                         f"moetx knows {', '.join(_FACTORS)} (or set make_optimizer.schedule "
                         f"to a moetx schedule)")
    import jax.numpy as jnp

    def schedule(step):
        step = jnp.maximum(0.0, jnp.asarray(step, jnp.float32) - step_offset)
        lr = jnp.asarray(1.0, jnp.float32)
        for name in names:
            if name == "constant":
                lr = lr * base_learning_rate
            elif name == "linear_warmup":
                lr = lr * jnp.minimum(1.0, step / warmup_steps)
            elif name == "linear_decay":
                lr = lr * base_learning_rate * jnp.minimum(
                    step / warmup_steps, 1.0 + decay_factor * (warmup_steps - step))
            elif name == "rsqrt_decay":
                lr = lr / jnp.sqrt(jnp.maximum(step, warmup_steps))
            elif name == "rsqrt_normalized_decay":
                lr = lr * math.sqrt(warmup_steps) / jnp.sqrt(jnp.maximum(step, warmup_steps))
            elif name == "decay_every":
                lr = lr * decay_factor ** jnp.floor(step / steps_per_decay)
            else:  # cosine_decay
                progress = jnp.maximum(0.0, (step - warmup_steps) / float(steps_per_cycle))
                lr = lr * jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
        return jnp.maximum(lr, min_learning_rate)

    return schedule


# -------------------------------------------------------------------------- partitioning
def standard_logical_axis_rules(activation_partitioning_dims: int = 1,
                                parameter_partitioning_dims: int = 1,
                                additional_rules: Sequence[Any] | None = None) -> dict:
    """T5X's standard rules -> moetx's (`parameter_partitioning_dims=2`, parameters sharded
    over the data axis too, is moetx's `fsdp`)."""
    if activation_partitioning_dims != 1:
        raise refuse(f"activation_partitioning_dims = {activation_partitioning_dims}",
                     "moetx shards activations over the batch only")
    if parameter_partitioning_dims not in (1, 2):
        raise CompatError(f"parameter_partitioning_dims must be 1 or 2, got "
                          f"{parameter_partitioning_dims}.")
    if additional_rules:
        raise refuse("partitioning.standard_logical_axis_rules.additional_rules",
                     "moetx's rules are moetx.trainer.partitioning.standard_logical_axis_rules")
    return {"fsdp": parameter_partitioning_dims == 2}


@dataclasses.dataclass(frozen=True)
class Partitioning:
    """The moetx mesh and axis rules a T5X partitioner stands for."""

    model_partitions: int
    expert_partitions: int
    fsdp: bool

    def mesh_fn(self):
        """Builds the ('data', 'expert', 'model') mesh: `model_partitions` model-parallel
        devices, the largest expert axis <= `expert_partitions` the rest divides into."""
        import jax

        from moetx.trainer import partitioning

        n = jax.device_count()
        if n % self.model_partitions:
            raise CompatError(f"num_partitions = {self.model_partitions} does not divide the "
                              f"{n} devices.")
        rest = n // self.model_partitions
        expert = max(d for d in range(1, min(rest, self.expert_partitions) + 1) if rest % d == 0)
        return partitioning.make_mesh((rest // expert, expert, self.model_partitions))

    def rules_fn(self):
        from moetx.trainer import partitioning

        return partitioning.standard_logical_axis_rules(fsdp=self.fsdp)


def _model_partitions(num_partitions, model_parallel_submesh) -> int:
    if num_partitions is not None and model_parallel_submesh is not None:
        raise CompatError("Set one of num_partitions and model_parallel_submesh, not both.")
    if model_parallel_submesh is not None:
        return int(math.prod(model_parallel_submesh))
    return int(num_partitions or 1)


def _rules(logical_axis_rules) -> bool:
    if logical_axis_rules is None:
        return False
    if isinstance(logical_axis_rules, dict) and set(logical_axis_rules) == {"fsdp"}:
        return logical_axis_rules["fsdp"]
    raise refuse("custom logical_axis_rules",
                 "moetx uses moetx.trainer.partitioning.standard_logical_axis_rules")


def PjitPartitioner(num_partitions: int | None = None,  # noqa: N802
                    model_parallel_submesh: Sequence[int] | None = None,
                    params_on_devices: bool = True, backend: str | None = None,
                    ici_mesh_shape: Sequence[int] | None = None,
                    dcn_mesh_shape: Sequence[int] | None = None,
                    logical_axis_rules: Any = None) -> Partitioning:
    """T5X's `partitioning.PjitPartitioner` -> a moetx mesh (data, 1, num_partitions)."""
    if ici_mesh_shape is not None or dcn_mesh_shape is not None:
        raise refuse("ici_mesh_shape / dcn_mesh_shape",
                     "set the mesh with num_partitions (moetx's make_mesh.mesh_shape)")
    if not params_on_devices or backend is not None:
        raise refuse("params_on_devices = False / backend", "moetx keeps parameters on the "
                     "devices of the default backend")
    return Partitioning(_model_partitions(num_partitions, model_parallel_submesh), 1,
                        _rules(logical_axis_rules))


def MoePjitPartitioner(num_expert_partitions: int = 1,  # noqa: N802
                       num_partitions: int | None = None,
                       model_parallel_submesh: Sequence[int] | None = None,
                       params_on_devices: bool = True, logical_axis_rules: Any = None,
                       state_filter_fn: Any = None) -> Partitioning:
    """T5X's MoE partitioner -> a moetx mesh with an expert axis of at most
    `num_expert_partitions` devices (T5X's upper bound)."""
    if not params_on_devices or state_filter_fn is not None:
        raise refuse("params_on_devices = False / state_filter_fn",
                     "moetx keeps the whole state on the devices")
    return Partitioning(_model_partitions(num_partitions, model_parallel_submesh),
                        int(num_expert_partitions), _rules(logical_axis_rules))


def compute_num_model_partitions(num_model_partitions: int | None = None,
                                 model_parallel_submesh: Sequence[int] | None = None) -> int:
    """T5X's helper: the model-parallel size."""
    return _model_partitions(num_model_partitions, model_parallel_submesh)


# ------------------------------------------------------------------------------- trainer
class Trainer:
    """T5X's `trainer.Trainer` as its run files configure it (`trainer_cls`): the number of
    microbatches and the learning-rate function."""

    def __init__(self, learning_rate_fn: Callable | None = None,
                 num_microbatches: int | None = None, weight_metrics_computer: Any = None):
        if weight_metrics_computer is not None:
            raise refuse("trainer.Trainer.weight_metrics_computer",
                         "moetx logs its own metrics (moetx.trainer.metrics)")
        self.learning_rate_fn = learning_rate_fn
        self.num_microbatches = num_microbatches


class MoeTrainer(Trainer):
    """T5X's MoE trainer. Its expert-gradient rescaling is not needed in moetx, whose
    gradients of expert-sharded parameters are exact under jit (tests/moe)."""

    def __init__(self, learning_rate_fn: Callable | None = None,
                 num_microbatches: int | None = None, num_expert_partitions: int = 1,
                 sharded_match_fn: Any = None, weight_metrics_computer: Any = None):
        super().__init__(learning_rate_fn, num_microbatches, weight_metrics_computer)
        self.num_expert_partitions = num_expert_partitions


def summarize_gin_config(*args, **kwargs) -> None:
    """T5X writes the gin config to TensorBoard; moetx writes MODEL_DIR/config.gin instead."""
    del args, kwargs
