"""dssn: semi-supervised semantic segmentation with DSSN (ACM MM 2023).

The stable public API (README, "Python API") is re-exported here.
"""

from dssn.apps.segmenter import Segmenter, load
from dssn.engine.evaluate import mean_iou
from dssn.method.components import contrastive_alignment, cplg_mask, ema_update
from dssn.models import DPT, DeepLabV3Plus, load_weights

__version__ = "0.1.0"

__all__ = [
    "load",
    "Segmenter",
    "DeepLabV3Plus",
    "DPT",
    "load_weights",
    "cplg_mask",
    "contrastive_alignment",
    "ema_update",
    "mean_iou",
    "__version__",
]
