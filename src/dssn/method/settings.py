"""The keys a method's ``method`` section can hold, as blocks each method's own section is built from.

Every method declares its section as a subclass of ``dssn.config.MethodConfig`` made of these
blocks and names it in ``Method.config_class``, so that a key only exists for the methods
that read it (tests/test_method_settings.py checks that each key is read).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dssn.config import MethodConfig


class ThresholdKeys(MethodConfig):
    threshold: float = Field(0.95, ge=0.0, le=1.0)
    """Confidence threshold: a pixel's pseudo label is trained on when the top class probability
    reaches it."""


class CPLGKeys(MethodConfig):
    tau_low: float = Field(0.92, ge=0.0, le=1.0)
    """CPLG (docs/method.md §4.1): a class is selected in an image when its highest probability
    exceeds ``tau_low``; methods that select by a fixed threshold use it in their diagnostics only
    (the CPLG selection the fixed threshold is compared with)."""
    ratio: float = Field(0.96, ge=0.0, le=1.0)
    """CPLG: the pixels within ``ratio`` of their class's highest probability are selected."""


class EMATeacherKeys(MethodConfig):
    ema_momentum: float = Field(0.996, ge=0.0, le=1.0)
    ema_rule: Literal["copy_first", "ramp"] = "copy_first"
    """The EMA teacher's momentum at step s (docs/method.md §8): ``copy_first``: 0 at step 0 (the
    teacher becomes a copy), then ``ema_momentum``; ``ramp``: ``min(1 - 1/(s+1), ema_momentum)``,
    as UniMatch V2 releases it."""
