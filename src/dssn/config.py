"""Typed run configuration: YAML presets, user files, ``key=value`` overrides.

A config is built in three layers, each overriding the one before:
the packaged preset (or a user YAML, which may name a preset as ``base``),
then command-line overrides. Every mistake is reported with the key path,
the file it came from and, for unknown keys, the closest valid names.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SerializeAsAny,
    ValidationError,
    field_validator,
)

from dssn.errors import DssnError
from dssn.registry import BACKBONES, DATASETS, METHODS, MODELS, UnknownNameError

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(DssnError, ValueError):
    """A config file or override is invalid; the message says where and how to fix it."""


class _Section(BaseModel):
    # Unknown keys are caught earlier with suggestions; forbid here as a safety net.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = "deeplabv3plus"
    """The network (``dssn.registry.MODELS``): ``deeplabv3plus`` (ResNet backbones) or ``dpt``
    (DINOv2 or DINOv3 encoders with UniMatch V2's DPT head)."""
    backbone: str = "resnet101"
    """The encoder (``dssn.registry.BACKBONES``): resnet18/34/50/101 for ``deeplabv3plus``;
    dinov2_s/b/l/g and dinov3_s/splus/b/l/l_sat/hplus/7b for ``dpt``. ``*_tiny`` are not released
    models: 4-block ViTs for tests and CPU smoke runs."""
    registers: Literal[0, 4] = 0
    """DINOv2 register tokens: 4 for the ``dinov2_vit*14_reg4`` encoders (DINOv3 has its own 4)."""
    rope_rescale: float | None = Field(None, ge=1)
    """DINOv3: in the student's training passes, multiply the RoPE coordinates by a random
    log-uniform factor in [1/r, r] (the pre-training augmentation; 2.0 there). Off by default;
    evaluation and the teacher's pseudo labels never."""
    pretrained: str | None = None
    """Backbone weights: an ImageNet ResNet in the released naming; for the ViT encoders an official
    ``dinov2_vit*14[_reg4]_pretrain.pth`` / ``dinov3_vit*16_pretrain_*.pth``, a Hugging Face
    ``transformers`` model folder or file, a released name (``dinov2_vitb14``), an https:// or
    file:// URL, or ``hf:<org>/<repo>`` (docs/training.md, "Encoder weights")."""
    feature_dropout: Literal["independent", "complementary"] = "independent"
    """DPT: the perturbed streams' channel masks, drawn independently or the second the
    complement of the first (as UniMatch V2's complementary dropout)."""
    lock_backbone: bool = False
    """DPT: freeze the encoder (no gradients, no optimizer state): the head alone trains."""
    output_stride: Literal[8, 16] = 16
    dilations: tuple[PositiveInt, PositiveInt, PositiveInt] = (6, 12, 18)
    decoder_channels: PositiveInt = 256
    backbone_width: PositiveInt = 64
    """Stem/layer1 width of the ResNet; 64 is the standard network (smaller for CPU demos)."""
    checkpoint_backbone: bool = False
    """Activation checkpointing: keep only each backbone stage's (ResNet) or block's (ViT) input
    and recompute it in the backward pass. Much less memory for about a third more compute; the
    math is unchanged (batch-norm statistics are not updated twice)."""

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return MODELS.check(name)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, backbone: str) -> str:
        return BACKBONES.check(backbone)


NETWORK_KEYS = {"deeplabv3plus": frozenset({"output_stride", "dilations", "decoder_channels", "backbone_width"}),
                "dpt": frozenset({"registers", "feature_dropout", "rope_rescale"})}
"""The ``model.*`` keys only one built-in network reads (the others every network reads); a key of
another network is refused. ``lock_backbone`` is refused by ``dssn.models.check_model_config``."""

FLAT_MODEL_KEYS = frozenset({"name", "backbone", "registers", "pretrained", "feature_dropout", "lock_backbone",
                             "output_stride", "dilations", "decoder_channels", "backbone_width",
                             "checkpoint_backbone"})
"""The ``model`` section as earlier versions saved it: every key, whichever network read it."""


def idle_model_keys(section: dict[str, Any]) -> dict[str, str]:
    """``{key: why}`` for the keys of a ``model`` section its built-in network does not read."""
    name = section.get("name", ModelConfig.model_fields["name"].default)
    if not isinstance(name, str) or name not in NETWORK_KEYS:
        return {}
    out = {}
    for key in section:
        readers = [net for net, keys in NETWORK_KEYS.items() if key in keys]
        if readers and name not in readers:
            out[key] = f"model.name={name} does not read it; it is a setting of model.name={' or '.join(readers)}"
    return out


class DataConfig(_Section):
    dataset: str = "pascal"
    """The dataset layout (``dssn.registry.DATASETS``, described in ``dssn.data.catalog``):
    pascal, cityscapes, coco, ade20k, folder (your own, described by ``dataset.yaml``), synthetic."""
    root: str = "data/VOC2012"
    num_classes: int = Field(21, ge=1)
    class_names: list[str] | None = None
    meta: str | None = None
    """``folder`` datasets: their ``dataset.yaml`` (relative to ``root`` unless absolute; default
    ``dataset.yaml``): class names, optional palette and value-to-class map."""
    labeled_split: str | None = "splits/732/labeled.txt"
    """Split files: paths relative to ``root`` unless absolute. For ``folder`` datasets any of
    the three may be null: labeled = images with a mask, unlabeled = images without one,
    val = the validation folders named in ``dataset.yaml``."""
    unlabeled_split: str | None = "splits/732/unlabeled.txt"
    val_split: str | None = "splits/val.txt"
    crop_size: PositiveInt = 513
    strong_ops: bool = True
    """The extra random operations of the strong view (PASCAL/COCO, ``docs/method.md`` §6)."""
    num_workers: int = Field(4, ge=0)
    ade20k_masks: Literal["raw", "mapped"] = "raw"
    """``ade20k`` only: ``raw``, the official annotations (0 other, 1..150 the classes), mapped to class
    ids as they load; ``mapped``, masks that already hold class ids 0..149 and 255 (written by
    ``dssn prepare ade20k``, or UniMatch V2's pre-processed annotations)."""

    @field_validator("dataset")
    @classmethod
    def _registered(cls, name: str) -> str:
        return DATASETS.check(name)


class MethodConfig(_Section):
    """The ``method`` section: ``name`` picks the method, whose own subclass of this class (its
    ``config_class`` in ``METHODS``, built from ``dssn.method.settings``) holds the keys it reads;
    a key another method reads is refused with the names of the methods that read it."""

    name: str = "dssn"
    """The training method (``dssn.registry.METHODS``): dssn, fixmatch, unimatch_v2, supervised."""

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return METHODS.check(name)

    @classmethod
    def idle_keys(cls, section: dict[str, Any]) -> dict[str, str]:
        """Keys of this method that ``section``'s other values leave unread, each with why
        (DSSN's ``threshold`` under CPLG selection); they are refused like another method's keys."""
        return {}


FLAT_METHOD_KEYS = frozenset({
    "name", "selection", "tau_low", "ratio", "threshold", "loss_image", "loss_feature", "align_image",
    "align_feature", "lambda_c", "weight_x", "weight_u", "ema_momentum", "ema_rule", "teacher_bn",
    "warmup_steps", "warmup_epochs"})
"""The one ``method`` section every method shared before each had its own: configs saved in run
folders and checkpoints by those versions hold exactly these keys (``upgrade_saved``)."""


def method_config_class(name: str) -> type[MethodConfig]:
    """The ``method`` section class of the method ``name`` (``UnknownNameError`` if none)."""
    return METHODS[name].config_class


def _owners(key: str) -> list[str]:
    return [name for name in METHODS if key in method_config_class(name).model_fields]


def idle_method_keys(section: dict[str, Any]) -> dict[str, str]:
    """``{key: why}`` for the keys of a ``method`` section its method does not read."""
    name = section.get("name", MethodConfig.model_fields["name"].default)
    if not isinstance(name, str) or name not in METHODS:
        return {}
    fields = method_config_class(name).model_fields
    out = {}
    for key in section:
        owners = _owners(key)
        if key not in fields and owners:
            out[key] = f"{name} does not read it; it is a setting of {', '.join(owners)} (method.name={owners[0]})"
    idle = method_config_class(name).idle_keys(section)
    out.update({key: why for key, why in idle.items() if key in section})
    return out


_SWITCHED = {"method": idle_method_keys, "model": idle_model_keys}
"""Sections whose ``name`` decides which of their keys are read."""


class TrainConfig(_Section):
    epochs: PositiveInt = 100
    iters: PositiveInt | None = None
    """Total iterations; overrides ``epochs`` when set."""
    batch_size: PositiveInt | None = None
    """Labeled images per process per micro-batch, set by hand (the global batch is then this x
    processes x ``accumulate``, and ``lr_scaling`` applies). None: derived from ``global_batch``."""
    batch_size_unlabeled: PositiveInt | None = None
    lr: PositiveFloat = 0.002
    lr_multi: PositiveFloat = 10.0
    """The head's learning rate is ``lr * lr_multi``; the backbone's is ``lr``."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, le=1.0)
    """SGD's momentum."""
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    """AdamW's betas."""
    weight_decay: float = Field(1e-4, ge=0.0)
    poly_power: float = Field(0.9, ge=0.0)
    labeled_loss: Literal["ce", "ohem"] = "ce"
    ohem_thresh: float = Field(0.7, ge=0.0, le=1.0)
    ohem_min_kept: int = Field(100_000, ge=0)
    seed: int = 0
    device: str = "auto"
    threads: PositiveInt | None = None
    """CPU threads for torch (None: torch's default)."""
    eval_every: PositiveInt = 1
    """Evaluate every N epochs (and always at the end)."""
    log_every: PositiveInt = 20
    progress: bool = True
    report: bool = True
    """Write ``report.html`` into the run folder when training ends (``dssn report RUN`` redoes it)."""
    # ---- checkpoints and resume
    checkpoint_every: int = Field(1000, ge=0)
    """Write a checkpoint every N iterations (0: only at epoch ends); one is always written at each
    epoch end and at the last step."""
    keep_last: int = Field(2, ge=0)
    """Periodic checkpoints kept in ``checkpoints/`` (older ones are deleted); ``last.pt`` and
    ``best.pt`` are always kept. 0: only ``last.pt`` and ``best.pt``."""
    resume: Literal["auto", "never", "force"] = "auto"
    """``run_dir`` already holding a run: ``auto`` resumes it if its config matches (else refuses and
    lists the differing keys), ``force`` resumes it with the new config anyway, ``never`` refuses."""
    deterministic: bool = False
    """Deterministic algorithms only (``torch.use_deterministic_algorithms``): with it, a run that is
    interrupted and resumed ends bit-identical to one that ran straight through (CPU)."""
    stop_after: int | None = Field(None, ge=1)
    """Debugging: stop after this many iterations as if killed (no extra checkpoint, no final eval)."""
    # ---- scale and speed
    accumulate: int = Field(1, ge=1)
    """Micro-batches per optimizer step (batch-norm statistics still come from one micro-batch at a
    time). With the batch derived from ``global_batch`` this is the least accumulation the plan uses."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Mixed precision of the training step (autocast); ``fp16`` adds dynamic loss scaling.
    ``auto``: bf16 on GPUs with native bf16 (compute capability 8.0+) and on CPUs with AMX or
    AVX-512 BF16, fp32 elsewhere (``dssn.engine.precision``; the run log and ``run_info.json``
    say which and why). Evaluation always runs in float32."""
    channels_last: bool | Literal["auto"] = "auto"
    """NHWC memory layout for networks and images; ``auto``: on GPUs only (on CPUs it was slower)."""
    compile: bool = False
    """``torch.compile`` the student's forward (the first steps are slow while it compiles)."""
    sync_bn: bool = True
    """Distributed runs on GPUs: batch-norm statistics over the global batch (SyncBatchNorm). CPU
    processes (gloo) cannot; their batch-norm buffers are averaged after every step instead."""
    # ---- the global batch on any number of processes (engine.plan), preemption
    global_batch: int = Field(2, ge=1)
    """Labeled images per optimizer step over all processes: the paper's batch, which a preset fixes.
    The engine splits it over the processes (and micro-batches) it has."""
    global_batch_unlabeled: int = Field(2, ge=1)
    max_batch_per_gpu: int | None = Field(None, ge=1)
    """Most labeled (and most unlabeled) images one process takes per micro-batch; the plan
    accumulates more micro-batches to keep the global batch. None: no limit."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """With a per-process batch set by hand: scale the learning rates by the ratio of the global batch
    it gives to ``global_batch`` (``linear``) or by its square root (``sqrt``)."""
    allow_replan: bool = False
    """Resume with a number of processes whose plan changes the global batch (refused otherwise)."""
    requeue: bool = False
    """Under SLURM: after the checkpoint written on SIGTERM/SIGUSR1, ``scontrol requeue $SLURM_JOB_ID``."""


class EvalConfig(_Section):
    mode: Literal["whole", "center_crop", "sliding"] = "whole"
    crop_size: PositiveInt | None = None
    """Window / crop size; defaults to ``data.crop_size``."""
    stride_ratio: float = Field(2 / 3, gt=0.0, le=1.0)
    batch_size: PositiveInt = 1
    scales: list[PositiveFloat] = Field(default_factory=lambda: [1.0], min_length=1)
    """Test-time scales: the image is resized by each and the softmax probabilities are averaged
    at the original size (e.g. [0.75, 1.0, 1.25]); [1.0] is plain single-scale inference."""
    flip: bool = False
    """Also average the horizontally flipped image's probabilities."""


class DiagConfig(_Section):
    """Training diagnostics: pseudo-label statistics, health checks, image panels."""

    enabled: bool = True
    """Compute the statistics at log steps (``train.log_every``); other steps are unaffected."""
    panels: int = Field(4, ge=0)
    """Validation and unlabeled images drawn at each evaluation (TensorBoard, report); 0 for none."""
    fixed_threshold: float = Field(0.95, ge=0.0, le=1.0)
    """The fixed confidence threshold CPLG's per-class selection is compared with."""
    grace: float = Field(0.05, ge=0.0, le=1.0)
    """Health warnings start after this fraction of the iterations (and after the warm-up)."""
    patience: int = Field(3, ge=1)
    """A health rule is reported once it has held at this many consecutive log steps."""
    # Thresholds of the health rules (``dssn.method.diagnostics.health_warnings``, docs/diagnostics.md).
    max_align_share: float = Field(0.5, ge=0.0, le=1.0)
    """Alignment dominating: its weighted share of the total loss is above this."""
    min_align_share: float = Field(1e-4, ge=0.0, le=1.0)
    """Alignment vanishing: it is switched on but its weighted share is below this."""
    max_random_similarity: float = Field(0.99, ge=-1.0, le=1.0)
    """Collapse: random pixel pairs are this similar (every pixel gets the same output)."""
    min_selected: float = Field(0.02, ge=0.0, le=1.0)
    """Selection starved: the teacher's selected fraction is below this after half of training;
    also the level it must have reached before a drop counts as a collapse."""
    collapse_ratio: float = Field(0.25, ge=0.0)
    """Selection collapsing: the selected fraction fell below this share of its highest value so far."""
    max_teacher_distance: float = Field(0.5, ge=0.0)
    """Teacher diverging: relative teacher-student parameter distance above this."""
    max_teacher_gap: float = Field(10.0, ge=0.0)
    """Teacher diverging: teacher mIoU this many points below the student's at an evaluation."""
    min_prediction_spread: float = Field(0.25, ge=0.0, le=1.0)
    """Single class: at an evaluation a network's ``prediction_spread`` is below this."""


class Config(_Section):
    name: str = "run"
    run_dir: str | None = None
    """Output folder; default ``runs/<name>-<method>-<time>``."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: method_config_class("dssn")())
    """The chosen method's own section (``method_config_class``)."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    diag: DiagConfig = DiagConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _own_section(cls, value: Any) -> Any:
        # A mapping becomes the section class of the method it names (build_config reports errors first).
        if isinstance(value, dict):
            return method_config_class(value.get("name", "dssn")).model_validate(value)
        return value

    def to_dict(self) -> dict[str, Any]:
        """The config as saved in run folders and checkpoints: without keys the method or the
        network leaves unread, so that the saved file loads as a config again."""
        return _without_idle(_without_idle(self.model_dump(mode="json"), "method"), "model")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _resolve_source(source: str) -> Path:
    """A preset name (``pascal``) or a path to a YAML file."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file '{source}' not found; presets are: {', '.join(preset_names())}")
        return path
    preset = PRESETS_DIR / f"{source}.yaml"
    if not preset.is_file():
        close = difflib.get_close_matches(source, preset_names(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"'{source}' is neither a config file nor a preset.{hint} Presets: {', '.join(preset_names())}"
        )
    return preset


def _load_layered(source: str, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    path = _resolve_source(source).resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = upgrade_saved(_read_yaml(path))
    base = data.pop("base", None)
    if base is None:
        return data, str(path)
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' names a preset or YAML file, got {type(base).__name__} {base!r}")
    base_data, _ = _load_layered(base, seen + (path,))
    _check_keys(base_data, Config, str(path))
    return merge_layers(base_data, data), str(path)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_layers(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; where ``top`` switches the method (or DSSN's selection) or the network,
    the keys ``base`` wrote for the one it switched away from are dropped (``pascal-dinov2
    method.name=unimatch_v2`` leaves the preset's ``selection`` behind), while a key ``top``
    itself writes for another method or network stays, to be refused."""
    merged = deep_merge(base, top)
    for section, idle_keys in _SWITCHED.items():
        before, after, written = base.get(section), merged.get(section), top.get(section)
        if isinstance(before, dict) and isinstance(after, dict) and isinstance(written, dict):
            newly_idle = set(idle_keys(after)) - set(idle_keys(before)) - set(written)
            merged[section] = {k: v for k, v in after.items() if k not in newly_idle}
    return merged


def _without_idle(data: dict[str, Any], section: str) -> dict[str, Any]:
    keys = data.get(section)
    if not isinstance(keys, dict):
        return data
    idle = _SWITCHED[section](keys)
    return {**data, section: {k: v for k, v in keys.items() if k not in idle}}


def upgrade_saved(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved before each method had its own section (and each network its own keys), in
    today's form: the keys its method or network did not read are dropped (they changed nothing
    then either)."""
    method, model = data.get("method"), data.get("model")
    if isinstance(method, dict) and set(method) == FLAT_METHOD_KEYS and method.get("name") in METHODS:
        data = _without_idle(data, "method")
    if isinstance(model, dict) and FLAT_MODEL_KEYS <= set(model):
        data = _without_idle(data, "model")
    return data


def _all_method_keys() -> list[str]:
    return list(dict.fromkeys(key for name in METHODS for key in method_config_class(name).model_fields))


def _check_keys(data: dict[str, Any], model: type[BaseModel], where: str, prefix: str = "") -> None:
    """Reject unknown keys, naming the closest valid ones (pydantic alone does not suggest)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        is_method = model is MethodConfig
        fields = _all_method_keys() if is_method else model.model_fields
        if not isinstance(key, str) or key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(str(path), valid, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{where}: unknown key '{path}'{hint} Valid keys here: {', '.join(valid)}")
        annotation = None if is_method else fields[key].annotation
        if key == "method" and model is Config:
            annotation = MethodConfig
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{path}' is a section; give its keys, e.g. {path}.<key>=...")
            _check_keys(value, annotation, where, prefix=f"{path}.")


def _check_read_keys(data: dict[str, Any], where: str) -> None:
    """Every ``method.*`` and ``model.*`` key is read by the chosen method and network, or the
    error says who reads it."""
    section = data.get("method", {})
    name = section.get("name", "dssn")
    try:
        METHODS.check(name if isinstance(name, str) else repr(name))
    except UnknownNameError as err:
        raise ConfigError(f"{where}: {err}") from None
    for key, why in idle_method_keys(section).items():
        raise ConfigError(f"{where}: method.{key}: {why}")
    model = data.get("model", {})
    for key, why in idle_model_keys(model).items():
        raise ConfigError(f"{where}: model.{key}: {why}")
    dropout = model.get("feature_dropout", ModelConfig.model_fields["feature_dropout"].default)
    if dropout != ModelConfig.model_fields["feature_dropout"].default and not getattr(
            METHODS[name], "perturbs_features", False):
        perturbing = [m for m in METHODS if getattr(METHODS[m], "perturbs_features", False)]
        raise ConfigError(f"{where}: model.feature_dropout: {name} perturbs no feature streams; it is read with "
                          f"method.name={' or '.join(perturbing)}")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "method.name=fixmatch"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=0.01)")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        if any(not part for part in parts):
            raise ConfigError(f"override '{item}': '{key}' has an empty part; keys are dotted names like train.lr")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        if isinstance(node.get(parts[-1]), dict):
            raise ConfigError(f"override '{item}' conflicts with an earlier override inside '{key}'")
        node[parts[-1]] = value
    return out


def _invalid(err: ValidationError, where: str, prefix: str = "") -> ConfigError:
    first = err.errors()[0]
    key = prefix + ".".join(str(p) for p in first["loc"])
    return ConfigError(f"{where}: key '{key}': {first['msg']} (got {first.get('input')!r})")


def build_config(data: dict[str, Any], where: str = "config") -> Config:
    data = upgrade_saved(data)
    _check_keys(data, Config, where)
    _check_read_keys(data, where)
    section = data.get("method")
    try:
        if isinstance(section, dict):  # validated on its own, so that errors name method.<key>
            data = {**data, "method": method_config_class(section.get("name", "dssn")).model_validate(section)}
    except ValidationError as err:
        raise _invalid(err, where, "method.") from None
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise _invalid(err, where) from None


def load_config(source: str, overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file and apply ``key=value`` overrides."""
    data, where = _load_layered(source)
    _check_keys(data, Config, where)
    if overrides:
        extra = parse_overrides(overrides)
        _check_keys(extra, Config, "command line")
        data = merge_layers(data, extra)
        where = f"{where} + command line"
    return build_config(data, where)
