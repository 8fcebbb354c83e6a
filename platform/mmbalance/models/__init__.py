"""Models: encoder registry (name -> ``Registered(cls, params)``) and the late-fusion classifier
(no Ray imports here)."""

from mmbalance.models.encoders import ENCODERS, build_encoder
from mmbalance.models.fusion import LateFusion

__all__ = ["ENCODERS", "LateFusion", "build_encoder"]
