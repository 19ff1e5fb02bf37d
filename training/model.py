"""The CLIP model: an image encoder (ViT or a small ResNet), a causal text transformer, a shared embedding.

Written on plain torch (no torchvision, no timm). Named sizes go from ``tiny``
(seconds per step on a laptop CPU) to ``B/32`` (the CLIP paper's ViT-B/32).
Images enter as uint8 (batch, 3, H, W) and are normalised here, on the model's
device, so data workers never spend CPU on float conversion.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


def normalisation(mean=MEAN, std=STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1): (x / 255 - mean) / std as x * scale + shift (CLIP's mean and std)."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return 1 / (255 * std), -mean / std


def normalise(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """0-255 images (uint8 or float) → normalised float: one converting copy, then two in-place passes
    (the textbook `(x / 255 - mean) / std` makes four passes and four allocations: 4x slower on a CPU)."""
    return images.to(scale.dtype, copy=True).mul_(scale).add_(shift)


LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; `size` names a preset, other fields override it when set (> 0)."""

    image_encoder: str = "vit"  # "vit" or "resnet"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    context_length: int = 32
    vocab_size: int = 4096
    embed_dim: int = 128
    grad_checkpointing: bool = False
    activation: str = "gelu"  # "quick_gelu" for OpenAI's weights (x * sigmoid(1.702 x))
    layer_norm_eps: float = 1e-5
    image_mean: tuple[float, float, float] = MEAN  # the normalisation the weights were trained with
    image_std: tuple[float, float, float] = STD


SIZES: dict[str, dict] = {
    "tiny": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                 text_width=128, text_layers=4, text_heads=4, embed_dim=128),
    "small": dict(image_size=128, patch_size=16, vision_width=384, vision_layers=6, vision_heads=6,
                  text_width=256, text_layers=6, text_heads=4, embed_dim=256),
    "S/32": dict(image_size=224, patch_size=32, vision_width=512, vision_layers=8, vision_heads=8,
                 text_width=512, text_layers=8, text_heads=8, embed_dim=512),
    "B/32": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                 text_width=512, text_layers=12, text_heads=8, embed_dim=512, context_length=77),
    "resnet-tiny": dict(image_encoder="resnet", image_size=64, vision_width=32, vision_layers=4,
                        text_width=128, text_layers=4, text_heads=4, embed_dim=128),
}  # fmt: skip


def model_config(size: str = "tiny", **overrides) -> ModelConfig:
    if size not in SIZES:
        from pipeline.errors import ConfigError

        raise ConfigError(f"unknown model size '{size}' (one of {', '.join(SIZES)})")
    return ModelConfig(**{**SIZES[size], **overrides})


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, x * sigmoid(1.702 x): its weights give other features under exact GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Block(nn.Module):
    """Pre-LN transformer block; attention through scaled_dot_product_attention (flash/mem-efficient on CUDA)."""

    def __init__(self, width: int, heads: int, activation: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), ACTIVATIONS[activation](), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, n, w = x.shape  # (batch, tokens, width)
        q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (batch, heads, tokens, head_dim)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, c: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, c.activation, c.layer_norm_eps) for _ in range(layers))
        self.grad_checkpointing = c.grad_checkpointing

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        self.patch = nn.Conv2d(3, c.vision_width, kernel_size=c.patch_size, stride=c.patch_size, bias=False)
        grid = (c.image_size // c.patch_size) ** 2
        self.cls = nn.Parameter(torch.randn(c.vision_width) * c.vision_width**-0.5)
        self.pos = nn.Parameter(torch.randn(grid + 1, c.vision_width) * 0.01)
        self.ln_pre = nn.LayerNorm(c.vision_width, eps=c.layer_norm_eps)
        self.transformer = Transformer(c.vision_width, c.vision_layers, c.vision_heads, c)
        self.ln_post = nn.LayerNorm(c.vision_width, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.vision_width, c.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (batch, patches, width)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1) + self.pos.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.head(self.ln_post(x[:, 0]))  # (batch, embed_dim)


class ResNet(nn.Module):
    """A small ResNet: stem + `vision_layers` stages of two basic blocks, channels doubling, global pool."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        width = c.vision_width
        layers = [nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        for stage in range(c.vision_layers):
            out = width * 2 if stage else width
            layers += [_BasicBlock(width, out, stride=2 if stage else 1), _BasicBlock(out, out, 1)]
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, c.embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class TextTransformer(nn.Module):
    def __init__(self, c: ModelConfig, eot_id: int):
        super().__init__()
        self.eot_id = eot_id
        self.token = nn.Embedding(c.vocab_size, c.text_width)
        self.pos = nn.Parameter(torch.randn(c.context_length, c.text_width) * 0.01)
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c)
        self.ln_final = nn.LayerNorm(c.text_width, eps=c.layer_norm_eps)
        self.head = nn.Linear(c.text_width, c.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token(ids) + self.pos[: ids.shape[1]]  # (batch, tokens, width)
        x = self.ln_final(self.transformer(x, causal=True))
        eot = (ids == self.eot_id).int().argmax(dim=1)  # the first <eot>: causal attention has seen the whole caption
        return self.head(x[torch.arange(ids.shape[0], device=ids.device), eot])


class CLIP(nn.Module):
    """Image and text towers, projections into one space, and the learned temperature (and SigLIP bias)."""

    def __init__(self, config: ModelConfig, eot_id: int = 2, siglip: bool = False):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config) if config.image_encoder == "vit" else ResNet(config)
        self.text = TextTransformer(config, eot_id)
        init = math.log(10) if siglip else LOGIT_SCALE_INIT
        self.logit_scale = nn.Parameter(torch.tensor(init))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None
        scale, shift = normalisation(config.image_mean, config.image_std)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """uint8 or float (batch, 3, H, W) in 0-255 → (batch, embed_dim)."""
        features = self.visual(normalise(images, self.scale, self.shift))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text(ids)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        return self.encode_image(images), self.encode_text(ids), scale, self.logit_bias

    def describe(self) -> dict:
        return {**asdict(self.config), "parameters": sum(p.numel() for p in self.parameters())}
