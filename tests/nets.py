"""Small networks shared by the tests."""

import torch
from torch import nn


class PixelwiseNet(nn.Module):
    """Each pixel's scores depend only on that pixel, so windows, flips and crops cannot change them."""

    def __init__(self, in_ch: int = 3, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_ch, classes, 1)

    def forward(self, x):
        return self.conv(x)
