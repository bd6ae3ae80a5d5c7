"""Example predictions drawn at each evaluation: the data, TensorBoard grids and a labelled figure.

A ``Panels`` holds display-sized uint8 arrays (every image fitted into the same
square, padding marked by ``*_valid``): validation images with their ground
truth and each evaluated model's prediction, and unlabeled weak views with the
pseudo label the method would train on and which pixels it selects. The latest
one is saved as ``panels/latest.npz`` in the run folder for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dssn.data.colors import (
    PAD_COLOUR,
    colourise,
    grid,
    palette_array,
    pseudo_label_rgb,
)
from dssn.files import atomic_path


@dataclass
class Panels:
    step: int
    val_image: np.ndarray  # [N, S, S, 3] uint8
    val_valid: np.ndarray  # [N, S, S] bool (False: display padding)
    val_gt: np.ndarray  # [N, S, S] uint8 class ids, 255 ignore
    val_pred: dict[str, np.ndarray] = field(default_factory=dict)  # model name -> [N, S, S]
    unl_image: np.ndarray | None = None  # [M, S, S, 3]
    unl_valid: np.ndarray | None = None  # [M, S, S] bool: inside the image and not crop padding
    unl_pseudo: np.ndarray | None = None  # [M, S, S]
    unl_selected: np.ndarray | None = None  # [M, S, S] bool
    names: list[str] = field(default_factory=list)  # validation image names

    def save(self, path: Path) -> Path:
        arrays = {"step": np.asarray(self.step), "val_image": self.val_image, "val_valid": self.val_valid,
                  "val_gt": self.val_gt, "names": np.asarray(self.names, dtype=str)}
        arrays.update({f"val_pred__{k}": v for k, v in self.val_pred.items()})
        if self.unl_image is not None:
            arrays.update(unl_image=self.unl_image, unl_valid=self.unl_valid, unl_pseudo=self.unl_pseudo,
                          unl_selected=self.unl_selected)
        with atomic_path(path, durable=False) as tmp, tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "Panels":
        with np.load(path, allow_pickle=False) as z:
            preds = {k.split("__", 1)[1]: z[k] for k in z.files if k.startswith("val_pred__")}
            unl = {k: (z[k] if k in z.files else None)
                   for k in ("unl_image", "unl_valid", "unl_pseudo", "unl_selected")}
            return cls(int(z["step"]), z["val_image"], z["val_valid"], z["val_gt"], preds, **unl,
                       names=[str(n) for n in z["names"]])

    # ---- drawing -----------------------------------------------------------------------------
    def val_columns(self) -> list[str]:
        return ["image", "ground truth", *self.val_pred]

    def val_tiles(self, palette: list[int]) -> list[list[np.ndarray]]:
        table = palette_array(palette)
        rows = []
        for i in range(len(self.val_image)):
            pad = ~self.val_valid[i][..., None]
            tiles = [self.val_image[i], colourise(self.val_gt[i], table),
                     *(colourise(p[i], table) for p in self.val_pred.values())]
            rows.append([np.where(pad, PAD_COLOUR, t) for t in tiles])
        return rows

    def unl_tiles(self, palette: list[int]) -> list[list[np.ndarray]]:
        if self.unl_image is None:
            return []
        table = palette_array(palette)
        return [[self.unl_image[i], pseudo_label_rgb(self.unl_pseudo[i], self.unl_selected[i],
                                                       self.unl_valid[i], table)]
                for i in range(len(self.unl_image))]

    def tensorboard_images(self, palette: list[int]) -> dict[str, np.ndarray]:
        """HWC uint8 grids: ``val`` (image | ground truth | each model) and ``unlabeled``
        (weak view | pseudo label, unselected pixels greyed out)."""
        out = {"val": grid(self.val_tiles(palette))}
        if self.unl_image is not None and len(self.unl_image):
            out["unlabeled"] = grid(self.unl_tiles(palette))
        return out
