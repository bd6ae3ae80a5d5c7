"""``dssn export``: a trained network as ONNX or as a weights-only safetensors file.

- ``onnx``: ``image [N, 3, H, W]`` (ImageNet-normalised RGB) -> ``logits [N, C, H, W]``,
  batch and image size dynamic, class names and palette in the model's metadata.
  Written with PyTorch's TorchScript-based exporter (no ``onnxscript`` needed) and,
  when onnxruntime is installed, checked against PyTorch on an image of a size other
  than the traced one (maximum difference at most ``tolerance``).
- ``safetensors``: the network's state dict (tensors only, nothing to unpickle) with
  the config, class names and palette in its metadata, and the config as YAML beside
  it (``model.safetensors`` -> ``model.yaml``). ``dssn eval``/``predict`` read it back.

Needs the ``export`` extra: ``pip install 'dssn[export]'``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from dssn.apps.inference import AUTO
from dssn.apps.segmenter import open_segmenter
from dssn.errors import DssnError
from dssn.files import atomic_path, atomic_write_text

FORMATS = ("onnx", "safetensors")
ONNX_OPSET = 17
TOLERANCE = 1e-4


class ExportError(DssnError, RuntimeError):
    """The export cannot be done or does not match PyTorch; the message says why."""


@dataclass
class ExportResult:
    paths: list[Path]
    network: str
    max_abs_diff: float | None = None
    """ONNX only: the largest |onnxruntime - PyTorch| on the check image (None: not checked)."""
    network_reason: str = ""
    """Why this network (``as asked``, ``best mIoU on the last evaluation: ...``)."""


class _Logits(nn.Module):
    """``forward(image) -> logits``: the plain inference path only (no perturbed streams)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image)


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ExportError(f"this export needs the '{module}' package: pip install 'dssn[export]'")


def export_onnx(model: nn.Module, path: Path, image_size: tuple[int, int], metadata: dict[str, str],
                opset: int = ONNX_OPSET, check: bool = True, tolerance: float = TOLERANCE) -> float | None:
    """Write ``model`` as ONNX to ``path``; returns the parity check's max difference (None if skipped)."""
    _need("onnx")
    import onnx  # the optional [export] extra, checked just above

    model = _Logits(model).eval().cpu()
    h, w = image_size
    sample = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(model, (sample,), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "height", 3: "width"}},
                              opset_version=opset, do_constant_folding=True, **kwargs)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, metadata)
        onnx.save(proto, str(tmp))
        diff = _check_onnx(model, tmp, (h, w), tolerance) if check else None
    return diff


def _check_onnx(model: nn.Module, path: Path, traced: tuple[int, int], tolerance: float) -> float | None:
    try:
        import onnxruntime as ort  # optional: without it the export is not checked
    except ImportError:
        warnings.warn("onnxruntime is not installed: the exported model was not checked against PyTorch",
                      stacklevel=3)
        return None
    h, w = traced
    # Another batch size and image size than traced, to exercise the dynamic axes.
    x = torch.randn(2, 3, h + 7, w + 13, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x.numpy()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"the ONNX model returns shape {got.shape} where PyTorch returns {expected.shape}")
    diff = float(abs(got - expected).max())
    if not diff <= tolerance:
        raise ExportError(f"the ONNX model's outputs differ from PyTorch by up to {diff:.3g} "
                          f"(> {tolerance:g}); nothing was written")
    return diff


def export_safetensors(model: nn.Module, path: Path, config_text: str, metadata: dict[str, str]) -> Path:
    """Write the state dict to ``path`` and the config to ``path`` with suffix ``.yaml``; returns the latter."""
    _need("safetensors")
    from safetensors.torch import save_file  # the optional [export] extra, checked just above

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config_path = path.with_suffix(".yaml")
    # The config first: a safetensors file is never left without the config beside it.
    atomic_write_text(config_path, config_text)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return config_path


def export_checkpoint(checkpoint: str, fmt: str, out: str | Path, *, config: str | None = None,
                      overrides: list[str] | None = None, model: str | None = AUTO, overwrite: bool = False,
                      image_size: tuple[int, int] | None = None, opset: int = ONNX_OPSET,
                      check: bool = True) -> ExportResult:
    """Export one network of ``checkpoint`` to ``out`` (``model``: ``auto``, the one that scored
    best on the last evaluation, as ``dssn.load`` chooses; or ``student``/``teacher``/``model``)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}' ({', '.join(FORMATS)})")
    _need("onnx" if fmt == "onnx" else "safetensors")
    out = Path(out).expanduser()
    targets = [out] if fmt == "onnx" else [out, out.with_suffix(".yaml")]
    if out.suffix == ".yaml" and fmt == "safetensors":
        raise ExportError(f"--out {out}: the safetensors file needs another suffix (its config goes to .yaml)")
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise ExportError(f"{', '.join(map(str, existing))} already exist(s); use --overwrite to replace, "
                          "or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)

    segmenter = open_segmenter(checkpoint, model, device="cpu", config=config, overrides=overrides)
    name, net, cfg = segmenter.network, segmenter.model, segmenter.config
    cfg_dict = cfg.to_dict()
    cfg_dict["data"]["class_names"] = segmenter.classes  # self-describing without the dataset
    metadata = {"dssn_config": json.dumps(cfg_dict), "class_names": json.dumps(segmenter.classes),
                "palette": json.dumps(segmenter.png_palette), "network": name,
                "source": os.path.basename(segmenter.source)}
    if fmt == "onnx":
        size = image_size or (cfg.data.crop_size, cfg.data.crop_size)
        diff = export_onnx(net, out, size, metadata, opset=opset, check=check)
        return ExportResult([out], name, diff, segmenter.network_reason)
    config_path = export_safetensors(net, out, yaml.safe_dump(cfg_dict, sort_keys=False), metadata)
    return ExportResult([out, config_path], name, network_reason=segmenter.network_reason)
