"""Neural-network modules of askd: CBAM, the IR-ResNet-CBAM and ResNet-CBAM backbones, the ArcFace and
classifier heads; BatchNorm folding for frozen models."""

from .cbam import CBAM
from .fold import fold_batchnorms
from .heads import ArcFace, ClassifierHead
from .iresnet import IRBlockCBAM, IResNetCBAM
from .resnet import BasicBlockCBAM, BottleneckCBAM, ResNetCBAM

__all__ = [
    "CBAM", "ArcFace", "BasicBlockCBAM", "BottleneckCBAM", "ClassifierHead", "IRBlockCBAM", "IResNetCBAM",
    "ResNetCBAM", "fold_batchnorms",
]
