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

from dssn.viz.colors import (
    FADE,
    IGNORE,
    NOT_SELECTED_GREY,
    PAD_COLOUR,
    colourise,
    grid,
    palette_array,
    pseudo_label_rgb,
)


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
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


def legend_handles(class_names: list[str], palette: list[int], extra: bool = True) -> list:
    from matplotlib.patches import Patch

    table = palette_array(palette)
    handles = [Patch(facecolor=table[c] / 255, edgecolor="0.3", linewidth=0.5, label=name)
               for c, name in enumerate(class_names)]
    if extra:
        handles.append(Patch(facecolor=table[IGNORE] / 255, edgecolor="0.3", linewidth=0.5, label="ignore / padding"))
    return handles


def panels_figure(panels: Panels, class_names: list[str], palette: list[int]):
    """One labelled matplotlib ``Figure``: each row a validation image (image | ground truth | each
    model's prediction) and, to the right, an unlabeled weak view with its pseudo label (unselected
    pixels faded to grey); column titles on top, a legend of the class colours below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    val_rows, unl_rows = panels.val_tiles(palette), panels.unl_tiles(palette)
    # (grid column, title, rows of tiles, index in a row)
    columns = [(c, title, val_rows, c) for c, title in enumerate(panels.val_columns())]
    n_val = len(columns)
    if unl_rows:
        columns += [(n_val + 1 + c, title, unl_rows, c)
                    for c, title in enumerate(["unlabeled weak view", "pseudo label"])]
    n_rows = max(len(val_rows), len(unl_rows))
    tile, gap = 1.75, (0.35 if unl_rows else 0.0)
    n_entries = len(class_names) + 1 + (1 if unl_rows else 0)
    width = tile * len(columns) + gap + 0.5
    ncol_legend = max(1, min(n_entries, int(width / 1.3)))
    legend_h = 0.24 * -(-n_entries // ncol_legend) + 0.15
    top_h = 0.65
    height = tile * n_rows + top_h + legend_h
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ratios = [1.0] * n_val + ([gap / tile, 1.0, 1.0] if unl_rows else [])
    spec = fig.add_gridspec(n_rows, len(ratios), width_ratios=ratios, left=0.4 / width, right=1 - 0.1 / width,
                            top=1 - top_h / height, bottom=legend_h / height, wspace=0.05, hspace=0.05)
    for r in range(n_rows):
        for k, (col, title, rows, idx) in enumerate(columns):
            ax = fig.add_subplot(spec[r, col])
            ax.set_xticks([])
            ax.set_yticks([])
            if r < len(rows):
                ax.imshow(rows[r][idx], interpolation="nearest")
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(title, fontsize=9)
            if k == 0 and r < len(panels.names):
                ax.set_ylabel(Path(panels.names[r]).stem, fontsize=8)
    handles = legend_handles(class_names, palette)
    if unl_rows:
        example = (1 - FADE) * palette_array(palette)[1] / 255 + FADE * NOT_SELECTED_GREY / 255
        handles.append(Patch(facecolor=example, edgecolor="0.3", linewidth=0.5,
                             label="not selected (class colour faded to grey)"))
    what = "validation predictions" + (" | teacher pseudo labels on unlabeled views" if unl_rows else "")
    fig.suptitle(f"{what}, iteration {panels.step}", fontsize=10, y=1 - 0.1 / height)
    fig.legend(handles=handles, loc="lower center", ncol=ncol_legend, fontsize=8, frameon=False)
    return fig
