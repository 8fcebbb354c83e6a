"""Encoder registry: a recipe's ``modalities.<m>.encoder`` name -> ``Registered(cls, params)``.

``cls`` is the module class (or builder) and ``params`` its pydantic parameter model, the same
entry shape as the objective registry (``mmbalance.registry``). Every builder takes its
validated params and the modality's per-sample input shape (from the shard manifest) and
returns a module mapping ``[B, *shape]`` to pooled features ``[B, out_dim]``, with ``out_dim``
set as an attribute so the fusion layer can size itself.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mmbalance.registry import Registered


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MLPParams(_Params):
    hidden: list[int] = Field(default_factory=lambda: [128], description="hidden layer widths")
    out_dim: int = Field(64, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class CNNParams(_Params):
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    out_dim: int = Field(64, ge=1)
    pooled_size: int = Field(
        4, ge=1, description="conv map is average-pooled to pooled_size x pooled_size before the projection"
    )


class ResNet18Params(_Params):
    # Pretrained weights would need a download at run time; from scratch is what the
    # CREMA-D/KS recipes of ARL/AUG/ARM use anyway.
    pretrained: Literal[False] = False


class TextParams(_Params):
    model_path: str | None = Field(None, description="local transformers model directory; null builds a tiny BERT")
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    vocab_size: int = Field(30522, ge=2)
    pad_token_id: int = 0


class MLPEncoder(nn.Module):
    """Vectors (any shape, flattened) -> MLP features."""

    def __init__(self, params: MLPParams, input_shape: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in params.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if params.dropout:
                layers.append(nn.Dropout(params.dropout))
            width = hidden
        layers += [nn.Linear(width, params.out_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = params.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


def _as_image(x: Tensor, channels: int) -> Tensor:
    """[B, H, W] -> [B, 1, H, W]; [B, C, H, W] unchanged."""
    x = x.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != channels:
        raise ValueError(f"expected {channels} input channels, got shape {tuple(x.shape)}")
    return x


class SmallCNN(nn.Module):
    """Spectrograms or small images ([H, W] or [C, H, W]) -> conv stack -> small pooled map -> linear.

    The map is pooled to a fixed grid rather than globally: where a stroke or a formant sits
    carries the class in digits and spectrograms, and a global average would discard it."""

    def __init__(self, params: CNNParams, input_shape: tuple[int, ...]):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ValueError(f"cnn encoder needs a [H, W] or [C, H, W] input, got shape {input_shape}")
        self.in_channels = 1 if len(input_shape) == 2 else input_shape[0]
        blocks: list[nn.Module] = []
        width = self.in_channels
        for out in params.channels:
            blocks += [
                nn.Conv2d(width, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            width = out
        self.conv = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(params.pooled_size), nn.Flatten())
        self.proj = nn.Sequential(nn.Linear(width * params.pooled_size**2, params.out_dim), nn.ReLU())
        self.out_dim = params.out_dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(_as_image(x, self.in_channels))  # [B, C' * pooled_size^2]
        return self.proj(h)  # [B, out_dim]


class ResNet18Encoder(nn.Module):
    """torchvision ResNet-18 from scratch. Accepts [H, W] / [C, H, W] (spectrogram, image) or
    [T, C, H, W] frames, which are folded into the batch and averaged over time."""

    def __init__(self, params: ResNet18Params, input_shape: tuple[int, ...]):
        super().__init__()
        from torchvision.models import resnet18

        if len(input_shape) not in (2, 3, 4):
            raise ValueError(f"resnet18 encoder needs [H, W], [C, H, W] or [T, C, H, W], got {input_shape}")
        self.frames = len(input_shape) == 4
        self.in_channels = 1 if len(input_shape) == 2 else input_shape[-3]
        net = resnet18(weights=None)
        if self.in_channels != 3:
            net.conv1 = nn.Conv2d(self.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        if self.frames:
            b, t = x.shape[:2]
            h = self.net(x.float().flatten(0, 1))  # [B*T, 512]
            return h.view(b, t, -1).mean(dim=1)  # [B, 512]
        return self.net(_as_image(x, self.in_channels))


class TextEncoder(nn.Module):
    """Token ids [L] -> transformers encoder -> [CLS] feature. Loaded from a local path, or a
    tiny BERT built from a config (nothing is fetched from a hub)."""

    def __init__(self, params: TextParams, input_shape: tuple[int, ...]):
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        if params.model_path:
            self.net = AutoModel.from_pretrained(params.model_path, local_files_only=True)
        else:
            cfg = BertConfig(
                vocab_size=params.vocab_size,
                hidden_size=params.hidden_size,
                num_hidden_layers=params.num_layers,
                num_attention_heads=params.num_heads,
                intermediate_size=4 * params.hidden_size,
                pad_token_id=params.pad_token_id,
                max_position_embeddings=max(64, input_shape[0]),
            )
            self.net = BertModel(cfg, add_pooling_layer=False)
        self.pad_token_id = params.pad_token_id
        self.out_dim = self.net.config.hidden_size

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.long()
        out = self.net(input_ids=ids, attention_mask=(ids != self.pad_token_id).long())
        return out.last_hidden_state[:, 0]  # [B, hidden]


ENCODERS: dict[str, Registered] = {
    "mlp": Registered(MLPEncoder, MLPParams),
    "cnn": Registered(SmallCNN, CNNParams),
    "resnet18": Registered(ResNet18Encoder, ResNet18Params),
    "text": Registered(TextEncoder, TextParams),
}


def build_encoder(name: str, params: dict, input_shape: tuple[int, ...]) -> nn.Module:
    entry = ENCODERS[name]
    return entry.cls(entry.validated(params), tuple(input_shape))
