"""Supervised baseline (SPEC 4b): the labeled loss alone, labeled data only."""

from __future__ import annotations

from torch import Tensor, nn

from dssn.config import MethodConfig, TrainConfig
from dssn.method.base import Batch, Method
from dssn.method.components import labeled_loss


class Supervised(Method):
    name = "supervised"
    uses_unlabeled = False

    def __init__(self, student: nn.Module, cfg: MethodConfig, train_cfg: TrainConfig,
                 iters_per_epoch: int = 1) -> None:
        super().__init__(student)
        self.train_cfg = train_cfg

    def training_step(self, batch: Batch, step: int) -> dict[str, Tensor]:
        x, y = batch.labeled
        loss = labeled_loss(self.student(x), y, self.train_cfg.labeled_loss,
                            self.train_cfg.ohem_thresh, self.train_cfg.ohem_min_kept)
        return {"loss": loss, "x": loss.detach()}

    def loss_weights(self) -> dict[str, float]:
        return {"x": 1.0}
