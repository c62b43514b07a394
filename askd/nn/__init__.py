"""Neural-network modules of askd: CBAM, the IR-ResNet-CBAM backbones, the ArcFace head."""

from .cbam import CBAM
from .heads import ArcFace
from .iresnet import IRBlockCBAM, IResNetCBAM

__all__ = ["CBAM", "ArcFace", "IRBlockCBAM", "IResNetCBAM"]
