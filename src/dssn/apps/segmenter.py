"""A trained network as a ready segmenter: ``dssn.load(path).predict(image)``.

``load`` reads any weights file dssn understands (:mod:`dssn.apps.inference`), chooses the
network (:func:`dssn.apps.inference.choose_network`) and returns a :class:`Segmenter`, which
takes image files, PIL images and RGB arrays, alone or in lists, and returns class-index
masks at each image's own size. Inference follows the config's ``eval`` section
(docs/method.md §7): the whole image or sliding windows, test-time scales and flip; a
``center_crop`` evaluation would leave most of the image out, so it runs as ``whole``.
``dssn predict`` is built on this class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dssn.apps.inference import AUTO, ONLY_NETWORK, InferenceError, load_for_inference
from dssn.config import Config
from dssn.constants import NETWORK_CHOICES
from dssn.data.colors import blend, palette_array
from dssn.data.datasets import open_image, to_rgb
from dssn.data.transforms import to_tensor_normalized
from dssn.engine.evaluate import predict_tta
from dssn.engine.runtime import resolve_device

ImageInput = str | os.PathLike | Image.Image | np.ndarray
"""An image file's path, a PIL image (any mode) or a uint8 array ``[H, W, 3]`` (also ``[H, W]``, ``[H, W, 4]``)."""
OVERLAY_ALPHA = 0.5
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageInputError(InferenceError):
    """An image given to a :class:`Segmenter` cannot be used; the message names it and says why."""


def read_rgb(image: ImageInput, name: str = "image") -> np.ndarray:
    """``image`` as RGB ``[H, W, 3]`` uint8. Greyscale is repeated, alpha dropped, 16-bit scaled.

    ``name`` is how error messages call the argument (``images[2]``); a file is named by its path.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if path.is_dir():
            raise ImageInputError(f"{name}: '{path}' is a folder; give image files "
                                  "(dssn predict segments whole folders)")
        if not path.is_file():
            raise ImageInputError(f"{name}: image file '{path}' does not exist")
        try:
            return np.asarray(to_rgb(open_image(path)))
        except _DECODE_ERRORS as err:
            raise ImageInputError(f"image '{path}' cannot be decoded: {err}") from None
    if isinstance(image, Image.Image):
        try:
            return np.asarray(to_rgb(image))
        except _DECODE_ERRORS as err:
            raise ImageInputError(f"{name}: the PIL image cannot be decoded: {err}") from None
    if isinstance(image, np.ndarray):
        return _array_rgb(image, name)
    if isinstance(image, Tensor):
        raise ImageInputError(f"{name}: a torch tensor; give a uint8 array [H, W, 3] "
                              "(e.g. tensor.permute(1, 2, 0).cpu().numpy()), a PIL image or a file path")
    raise ImageInputError(f"{name}: {type(image).__name__} is not an image; give an image file path, a PIL "
                          "image or a uint8 array [H, W, 3] (or a list of them)")


def _array_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageInputError(f"{name}: a {array.dtype} array; give uint8 RGB values 0..255 "
                              "(for floats in 0..1: (array * 255).round().astype(np.uint8))")
    shape = tuple(array.shape)
    if array.ndim == 3 and shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        rgb = np.repeat(array[:, :, None], 3, axis=2)  # greyscale, as PIL's "L" -> "RGB"
    elif array.ndim == 3 and shape[2] in (3, 4):
        rgb = array[:, :, :3]  # RGBA: the alpha channel is dropped, as for files
    else:
        hint = ("; channels first? use array.transpose(1, 2, 0)"
                if array.ndim == 3 and shape[0] in (1, 3, 4) else "")
        raise ImageInputError(f"{name}: an array of shape {shape}; expected [H, W, 3] (RGB), [H, W, 4] (RGBA) "
                              f"or [H, W] (greyscale){hint}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageInputError(f"{name}: an empty image (shape {shape})")
    return np.ascontiguousarray(rgb)


class Segmenter:
    """One trained network, ready to segment images (eval mode, no gradients).

    Made by :func:`load`. ``predict`` returns class-index masks at each image's own size;
    ``classes`` names the classes, ``palette`` gives their colours, ``overlay`` draws a mask
    on its image, ``to`` moves the network. Attributes: ``model`` (the ``nn.Module``),
    ``config`` (its :class:`~dssn.config.Config`; ``config.eval`` decides the inference),
    ``network`` (``student``, ``teacher`` or ``model``) and ``network_reason`` (why that one),
    ``device``, ``source`` (the file read).
    """

    def __init__(self, model: nn.Module, config: Config, classes: Sequence[str], png_palette: Sequence[int],
                 network: str = "model", network_reason: str = "", source: str = "") -> None:
        if len(classes) != config.data.num_classes:
            raise InferenceError(f"{len(classes)} class names for data.num_classes={config.data.num_classes}")
        self.model = model.eval()
        self.config = config
        self.classes = list(classes)
        self.png_palette = [int(v) for v in palette_array(list(png_palette)).reshape(-1)]
        """Flat RGB of 256 colours, for palette PNGs (``Image.putpalette``); index 255 is the ignore colour."""
        self.network = network
        self.network_reason = network_reason
        self.source = source
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """The colour ``(r, g, b)`` of each class, in class order (as in the masks ``dssn predict`` writes)."""
        table = palette_array(self.png_palette)
        return [tuple(int(v) for v in table[c]) for c in range(self.num_classes)]

    def to(self, device: torch.device | str) -> Segmenter:
        """Move the network to ``device`` (``cpu``, ``cuda``, ``cuda:1``, ``auto``); returns this segmenter."""
        self.device = resolve_device(str(device))
        self.model.to(self.device).eval()
        return self

    def __repr__(self) -> str:
        e = self.config.eval
        return (f"Segmenter({self.network} of {self.source or 'a model'}: {self.config.model.name}, "
                f"{self.num_classes} classes, eval {e.mode}, scales {list(e.scales)}, flip {e.flip}, "
                f"on {self.device})")

    def __call__(self, images: ImageInput | Sequence[ImageInput], **kwargs) -> object:
        """Same as :meth:`predict`."""
        return self.predict(images, **kwargs)

    def predict(self, images: ImageInput | Sequence[ImageInput], *, return_probs: bool = False,
                return_tensors: bool = False, batch_size: int = 4) -> object:
        """Segment one image or a list of images.

        Args:
            images: an image file path, a PIL image or a uint8 array ``[H, W, 3]``, or a list of
                them. Greyscale and RGBA images are converted to RGB (alpha dropped).
            return_probs: also return each image's class probabilities ``[C, H, W]`` (float32).
            return_tensors: torch tensors on the segmenter's device instead of NumPy arrays.
            batch_size: images of the same size run together, this many at a time.

        Returns:
            For one image its mask ``[H, W]`` at the image's size: class indices, NumPy uint8
            (int64 tensor with ``return_tensors``); with ``return_probs`` a pair ``(mask, probs)``.
            For a list, a list of those in the same order.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InferenceError(f"batch_size must be a positive integer, got {batch_size!r}")
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        rgbs = [read_rgb(img, "image" if single else f"images[{i}]") for i, img in enumerate(items)]
        results: list[object] = [None] * len(rgbs)
        for chunk in _same_size_chunks(rgbs, batch_size):
            masks, probs = self._segment([rgbs[i] for i in chunk], return_probs)
            for k, i in enumerate(chunk):
                mask = masks[k] if return_tensors else masks[k].cpu().numpy().astype(self._mask_dtype)
                if not return_probs:
                    results[i] = mask
                else:
                    results[i] = (mask, probs[k] if return_tensors else probs[k].cpu().numpy())
        return results[0] if single else results

    def overlay(self, image: ImageInput, mask: np.ndarray | Tensor, alpha: float = OVERLAY_ALPHA) -> Image.Image:
        """``image`` with the class colours of ``mask`` (``[H, W]``, e.g. from :meth:`predict`)
        blended in at ``alpha`` (0: the image only, 1: the colours only), as an RGB PIL image."""
        rgb = read_rgb(image)
        classes = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
        if classes.shape != rgb.shape[:2]:
            raise ImageInputError(f"mask: shape {tuple(classes.shape)} does not match the image's "
                                  f"{rgb.shape[0]}x{rgb.shape[1]} (give the [H, W] class-index mask of this image)")
        if not np.issubdtype(classes.dtype, np.integer):
            raise ImageInputError(f"mask: a {classes.dtype} array; give class indices (integers)")
        if not 0 <= alpha <= 1:
            raise ImageInputError(f"alpha must be between 0 and 1, got {alpha}")
        return Image.fromarray(blend(rgb, classes, self.png_palette, alpha))

    @property
    def _mask_dtype(self) -> type:
        return np.uint8 if self.num_classes <= 256 else np.int64

    @torch.no_grad()  # not inference_mode: returned tensors stay usable in ordinary (in-place) code
    def _segment(self, rgbs: list[np.ndarray], return_probs: bool) -> tuple[Tensor, Tensor | None]:
        """Masks ``[B, H, W]`` (int64) and, if asked, probabilities ``[B, C, H, W]`` of same-size images."""
        self.model.eval()
        cfg, e = self.config, self.config.eval
        mode = "whole" if e.mode == "center_crop" else e.mode
        crop = e.crop_size or cfg.data.crop_size
        batch = torch.stack([to_tensor_normalized(Image.fromarray(rgb)) for rgb in rgbs]).to(self.device)
        scores = predict_tta(self.model, batch, self.num_classes, mode, crop, e.stride_ratio, e.scales, e.flip)
        masks = scores.argmax(dim=1)
        if not return_probs:
            return masks, None
        # predict_tta returns probabilities when it averages; else logits (whole) or window sums (sliding).
        averaged = list(e.scales) != [1.0] or e.flip
        if averaged:
            probs = scores
        elif mode == "sliding":
            probs = scores / scores.sum(1, keepdim=True)
        else:
            probs = scores.softmax(1)
        return masks, probs.float()


def _same_size_chunks(rgbs: list[np.ndarray], batch_size: int) -> list[list[int]]:
    """Indices of ``rgbs`` in groups of one image size, at most ``batch_size`` each."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, rgb in enumerate(rgbs):
        by_size.setdefault(rgb.shape[:2], []).append(i)
    return [group[s : s + batch_size] for group in by_size.values() for s in range(0, len(group), batch_size)]


def open_segmenter(path: str | os.PathLike, network: str | None = AUTO, device: torch.device | str | None = "auto",
                   config: str | None = None, overrides: Sequence[str] | None = None,
                   config_hint: str = "cli") -> Segmenter:
    """:func:`load` without its message; ``device=None`` takes the config's ``train.device``.
    ``config_hint``: how a missing config is asked for (``cli``: ``--config``, ``python``: ``config=``)."""
    if network is None:
        network = AUTO
    if network not in NETWORK_CHOICES:
        raise InferenceError(f"network={network!r}: choose one of {', '.join(NETWORK_CHOICES)}")
    # Every network in the file is built on the CPU; only the chosen one moves to the device.
    loaded = load_for_inference(path, config, list(overrides or []), device="cpu", config_hint=config_hint)
    choice = loaded.choose(network)
    segmenter = Segmenter(loaded.models[choice.name], loaded.cfg, loaded.class_names, loaded.palette,
                          choice.name, choice.reason, loaded.source)
    return segmenter.to(device if device is not None else loaded.cfg.train.device)


def load(path: str | os.PathLike, network: str = AUTO, device: torch.device | str = "auto", *,
         config: str | None = None, overrides: Sequence[str] | None = None, verbose: bool = True) -> Segmenter:
    """Load a trained network as a :class:`Segmenter`, ready to segment images.

    >>> seg = dssn.load("runs/NAME/best.pt")
    >>> mask = seg.predict("photo.jpg")          # uint8 [H, W] class indices, the photo's size
    >>> seg.overlay("photo.jpg", mask).save("overlay.png")

    Args:
        path: a run's checkpoint (``last.pt``, ``best.pt``, ``checkpoints/step-N.pt``), a
            ``.safetensors`` file from ``dssn export`` (its config is in its metadata or the
            YAML beside it) or a released ``.pth`` state dict (then ``config`` is needed).
        network: ``"auto"`` takes the network that scored the best mIoU on the checkpoint's
            last evaluation (the student or the EMA teacher; the teacher on a tie or when the
            file holds no scores) and says which when ``verbose``; ``"student"`` or ``"teacher"``
            force one; released files hold one network, ``"model"``.
        device: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda:1"``...
        config: a preset name or YAML file saying what network a released ``.pth`` holds;
            for dssn checkpoints and exports it replaces the config they carry.
        overrides: ``key=value`` config changes, e.g. ``["eval.mode=sliding",
            "eval.scales=[0.75,1.0,1.25]", "eval.flip=true"]`` to change how images are segmented.
        verbose: print which network ``"auto"`` chose, and why, when the file holds several.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        dssn.errors.DssnError: the file is not one of the above, has no config, lacks the
            asked network or does not fit its config; the message names the file and the fix.
    """
    segmenter = open_segmenter(path, network, device, config, overrides, config_hint="python")
    if verbose and network == AUTO and segmenter.network_reason != ONLY_NETWORK:
        print(f"dssn.load: {segmenter.source}: using the {segmenter.network} ({segmenter.network_reason})")
    return segmenter
