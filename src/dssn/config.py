"""Typed run configuration: YAML presets, user files, ``key=value`` overrides.

A config is built in three layers, each overriding the one before:
the packaged preset (or a user YAML, which may name a preset as ``base``),
then command-line overrides. Every mistake is reported with the key path,
the file it came from and, for unknown keys, the closest valid names.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator

from dssn.errors import DssnError
from dssn.registry import BACKBONES, METHODS, MODELS

PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(DssnError, ValueError):
    """A config file or override is invalid; the message says where and how to fix it."""


class _Section(BaseModel):
    # Unknown keys are caught earlier with suggestions; forbid here as a safety net.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    dilations: tuple[int, int, int] = (6, 12, 18)
    decoder_channels: int = 256
    backbone_width: int = 64
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


class DataConfig(_Section):
    dataset: Literal["pascal", "cityscapes", "coco", "ade20k", "folder", "synthetic"] = "pascal"
    root: str = "data/VOC2012"
    num_classes: int = 21
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
    crop_size: int = 513
    strong_ops: bool = True
    """The extra random operations of the strong view (PASCAL/COCO, ``docs/method.md`` §6)."""
    num_workers: int = 4
    ade20k_masks: Literal["raw", "mapped"] = "raw"
    """``ade20k`` only: ``raw``, the official annotations (0 other, 1..150 the classes), mapped to class
    ids as they load; ``mapped``, masks that already hold class ids 0..149 and 255 (written by
    ``dssn prepare ade20k``, or UniMatch V2's pre-processed annotations)."""


class MethodConfig(_Section):
    name: str = "dssn"
    """The training method (``dssn.registry.METHODS``): dssn, fixmatch, unimatch_v2, supervised."""
    selection: Literal["cplg", "threshold"] = "cplg"
    tau_low: float = 0.92
    ratio: float = 0.96
    threshold: float = 0.95
    """Confidence threshold for ``selection: threshold`` and for ``fixmatch`` and ``unimatch_v2``."""
    loss_image: bool = True
    """L_s: teacher pseudo labels supervise the two CutMix-ed strong views."""
    loss_feature: bool = True
    """L_fp: the student's weak prediction supervises the perturbed feature streams."""
    align_image: bool = True
    align_feature: bool = True
    lambda_c: float = 0.005
    weight_x: float = 0.5
    weight_u: float = 0.125
    ema_momentum: float = 0.996
    ema_rule: Literal["copy_first", "ramp"] = "copy_first"
    """The EMA teacher's momentum at step s (docs/method.md §8): ``copy_first``: 0 at step 0 (the
    teacher becomes a copy), then ``ema_momentum``; ``ramp``: ``min(1 - 1/(s+1), ema_momentum)``,
    as UniMatch V2 releases it."""
    teacher_bn: Literal["released", "batch", "running"] = "released"
    """Batch norm of the EMA teacher: ``released`` normalises by each weak batch's own statistics
    during the first epoch and by the running statistics from the second epoch on (what the
    authors' script does: its teacher starts in training mode and its end-of-epoch evaluation
    leaves it in eval mode); ``batch`` and ``running`` use one of the two for the whole run."""
    warmup_steps: int = 1
    warmup_epochs: float = 0.0
    """L_s is left out until both warm-ups have passed."""

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return METHODS.check(name)


class TrainConfig(_Section):
    epochs: int = 100
    iters: int | None = None
    """Total iterations; overrides ``epochs`` when set."""
    batch_size: int = 2
    """Labeled images per step."""
    batch_size_unlabeled: int = 2
    lr: float = 0.002
    lr_multi: float = 10.0
    """The head's learning rate is ``lr * lr_multi``; the backbone's is ``lr``."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    """SGD's momentum."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's betas."""
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    labeled_loss: Literal["ce", "ohem"] = "ce"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    """CPU threads for torch (None: torch's default)."""
    eval_every: int = 1
    """Evaluate every N epochs (and always at the end)."""
    log_every: int = 20
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
    """Micro-batches per optimizer step: one process with ``accumulate=4`` takes the effective batch,
    iterations per epoch and learning-rate schedule of four processes (batch-norm statistics
    still come from one micro-batch at a time)."""
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


class EvalConfig(_Section):
    mode: Literal["whole", "center_crop", "sliding"] = "whole"
    crop_size: int | None = None
    """Window / crop size; defaults to ``data.crop_size``."""
    stride_ratio: float = 2 / 3
    batch_size: int = 1
    scales: list[PositiveFloat] = Field(default_factory=lambda: [1.0], min_length=1)
    """Test-time scales: the image is resized by each and the softmax probabilities are averaged
    at the original size (e.g. [0.75, 1.0, 1.25]); [1.0] is plain single-scale inference."""
    flip: bool = False
    """Also average the horizontally flipped image's probabilities."""


class DiagConfig(_Section):
    """Training diagnostics: pseudo-label statistics, health checks, image panels."""

    enabled: bool = True
    """Compute the statistics at log steps (``train.log_every``); other steps are unaffected."""
    panels: int = 4
    """Validation and unlabeled images drawn at each evaluation (TensorBoard, report); 0 for none."""
    fixed_threshold: float = 0.95
    """The fixed confidence threshold CPLG's per-class selection is compared with."""
    grace: float = 0.05
    """Health warnings start after this fraction of the iterations (and after the warm-up)."""
    patience: int = Field(3, ge=1)
    """A health rule is reported once it has held at this many consecutive log steps."""
    max_align_share: float = 0.5
    min_align_share: float = 1e-4
    max_random_similarity: float = 0.99
    min_selected: float = 0.02
    collapse_ratio: float = 0.25
    max_teacher_distance: float = 0.5
    max_teacher_gap: float = 10.0
    """Thresholds of the health rules; see ``dssn.method.diagnostics.HealthRules`` and docs/diagnostics.md."""


class Config(_Section):
    name: str = "run"
    run_dir: str | None = None
    """Output folder; default ``runs/<name>-<method>-<time>``."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    diag: DiagConfig = DiagConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


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
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data, str(path)
    base_data, _ = _load_layered(str(base), seen + (path,))
    return deep_merge(base_data, data), str(path)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_keys(data: dict[str, Any], model: type[BaseModel], where: str, prefix: str = "") -> None:
    """Reject unknown keys, naming the closest valid ones (pydantic alone does not suggest)."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        fields = model.model_fields
        if key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(path, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{where}: unknown key '{path}'{hint} Valid keys here: {', '.join(valid)}")
        annotation = fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{path}' is a section; give its keys, e.g. {path}.<key>=...")
            _check_keys(value, annotation, where, prefix=f"{path}.")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "method.name=fixmatch"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=0.01)")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return out


def build_config(data: dict[str, Any], where: str = "config") -> Config:
    _check_keys(data, Config, where)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{where}: key '{key}': {first['msg']} (got {first.get('input')!r})") from None


def load_config(source: str, overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file and apply ``key=value`` overrides."""
    data, where = _load_layered(source)
    _check_keys(data, Config, where)
    if overrides:
        extra = parse_overrides(overrides)
        _check_keys(extra, Config, "command line")
        data = deep_merge(data, extra)
        where = f"{where} + command line"
    return build_config(data, where)
