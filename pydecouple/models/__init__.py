"""A small model zoo: CIFAR VGGs and ResNets, a CPU-sized VGG, a tiny CNN for
the 8x8 digits; each dense or decoupled.

Every model takes pixel values in [0, 1] and starts with :class:`Normalize`,
so attacks and augmentations work in pixel space.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Union

import torch
import torch.nn as nn

from ..nn.modules import BasicBlock, Bottleneck

__all__ = ["Normalize", "VGG", "CifarResNet", "build", "ARCHS", "DATASET_STATS"]

# Channel mean/std of the training images (cifar: the subset's README).
DATASET_STATS: Dict[str, tuple] = {
    "cifar10": ((0.491, 0.482, 0.447), (0.245, 0.243, 0.261)),
    "digits": ((0.3052,), (0.3719,)),
}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std as buffers (in the state dict)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"Normalize: mean and std need the same length, got {len(mean)} and {len(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _vgg_features(cfg: Sequence[Union[int, str]], in_channels: int) -> nn.Sequential:
    """Flat conv-BN-ReLU chain (torchvision's layout): gated blocks chain their masks."""
    layers: List[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """CIFAR-style VGG with BN: ``features`` (flat Sequential), global average
    pool, one linear classifier."""

    def __init__(self, cfg: Sequence[Union[int, str]], num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = _vgg_features(cfg, in_channels)
        width = [v for v in cfg if v != "M"][-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(int(width), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (depth 6n+2, widths 16/32/64), 1x1-conv shortcuts."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, block: str = "basic",
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        blk = BasicBlock if block == "basic" else Bottleneck
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        c = 16
        stages = []
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(blk(c, planes, 2 if (i > 0 and j == 0) else 1))
                c = planes * blk.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


VGG_CFGS = {
    # 6 convs, 5 gated: the CPU-sized VGG of the experiments (docs/method.md).
    "small_vgg": [64, 64, "M", 128, 128, "M", 256, 256, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg_cfg_e": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                  512, 512, 512, 512, "M"],
    # 8x8 single-channel digits: 3 convs, 2 gated.
    "tiny_cnn": [16, 32, "M", 32, "M"],
}


def _default_stats(in_channels: int) -> tuple:
    if in_channels == 1:
        return DATASET_STATS["digits"]
    if in_channels == 3:
        return DATASET_STATS["cifar10"]
    return (0.5,) * in_channels, (0.25,) * in_channels


ARCHS: Dict[str, Callable[..., nn.Module]] = {}
for _name, _cfg in VGG_CFGS.items():
    ARCHS[_name] = (lambda cfg: (lambda **kw: VGG(cfg, **kw)))(_cfg)
ARCHS["resnet20"] = lambda **kw: CifarResNet(20, **kw)
ARCHS["resnet56"] = lambda **kw: CifarResNet(56, **kw)
# Bottleneck blocks (1x1 - 3x3 - 1x1, expansion 4): 5 per stage, 45 convs + stem + head = 47 layers.
ARCHS["resnet47_bottleneck"] = lambda **kw: CifarResNet(32, block="bottleneck", **kw)


def build(arch: str, num_classes: int = 10, decoupled: bool = False, in_channels: int = 3, *,
          mean: Sequence[float] = None, std: Sequence[float] = None, decouple_kwargs: dict = None, **kw) -> nn.Module:
    """Build a zoo model.

    Args:
        arch: one of ``ARCHS`` (small_vgg, vgg16, vgg_cfg_e, resnet20, resnet56, resnet47_bottleneck, tiny_cnn).
        num_classes: classifier width.
        decoupled: return the decoupled (gated) form (``pydecouple.nn.decouple``).
        in_channels: image channels (3 for CIFAR, 1 for digits).
        mean, std: normalisation of [0, 1] pixels; default from the channel count.
        decouple_kwargs: passed to ``decouple`` (gate options).
    """
    if arch not in ARCHS:
        raise ValueError(f"models.build: unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    dm, ds = _default_stats(in_channels)
    model = ARCHS[arch](num_classes=num_classes, in_channels=in_channels, mean=mean or dm, std=std or ds, **kw)
    if decoupled:
        from ..nn.decouple import decouple

        model = decouple(model, inplace=True, **(decouple_kwargs or {}))
    return model
