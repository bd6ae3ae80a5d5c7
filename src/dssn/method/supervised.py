"""Supervised baseline (``docs/method.md`` §5.1): the labeled loss alone, labeled data only."""

from __future__ import annotations

from torch import Tensor

from dssn.method.base import Batch, Method
from dssn.method.components import labeled_loss


class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        x, y = batch.labeled
        loss = labeled_loss(self.student(x), y, self.train_cfg.labeled_loss,
                            self.train_cfg.ohem_thresh, self.train_cfg.ohem_min_kept)
        return {"loss": loss, "x": loss.detach()}

    def loss_weights(self) -> dict[str, float]:
        return {"x": 1.0}
