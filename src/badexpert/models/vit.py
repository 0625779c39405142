"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 and 32x32 images."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BadExpertError

PATCH_CHOICES = (4, 7, 5, 6, 8, 3, 2)


def default_patch_size(image_size: tuple[int, int]) -> int:
    """4 where it divides the image (28 and 32), else the first of 7, 5, 6, 8, 3, 2 that does."""
    for p in PATCH_CHOICES:
        if image_size[0] % p == 0 and image_size[1] % p == 0:
            return p
    raise BadExpertError(
        f"the ViT needs an image size divisible by one of {PATCH_CHOICES}, got {image_size[0]}x{image_size[1]}; "
        "resize the images or choose another architecture"
    )


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Patch embedding, class token, learned position embeddings, pre-norm blocks, linear head.

    ``width`` is the embedding dimension (default 128, must divide by ``heads``); the patch size
    defaults to :func:`default_patch_size` and the model only accepts the image size it was built for.
    """

    #: one convolution (the patch embedding), then linear layers: the channels-last layout gains
    #: nothing and slows its training and backward pass (``bench/train_layout.py``)
    channels_last_safe = False

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        width: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        if width % heads:
            raise BadExpertError(f"the ViT width ({width}) must be a multiple of its {heads} heads")
        p = patch_size or default_patch_size(image_size)
        self.image_size = tuple(image_size)
        self.patch_embed = nn.Conv2d(in_channels, width, p, stride=p)
        tokens = (image_size[0] // p) * (image_size[1] // p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, width))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.blocks(self.embed(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens: patch embedding, class token, position embeddings."""
        if tuple(x.shape[-2:]) != self.image_size:
            raise BadExpertError(
                f"this ViT was built for {self.image_size[0]}x{self.image_size[1]} images, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> logits: the final norm and the linear head on the class token."""
        return self.head(self.norm(x)[:, 0])

    def cut_points(self) -> tuple[str, ...]:
        """``embed`` (after the embeddings), then ``block1`` .. ``blockN`` (after each transformer block)."""
        return ("embed", *(f"block{i + 1}" for i in range(len(self.blocks))))

    def split(self, at: str) -> tuple[nn.Module, nn.Module]:
        points = self.cut_points()
        if at not in points:
            raise BadExpertError(f"'{at}' is not a cut point of this model; choose one of: {', '.join(points)}")
        k = points.index(at)
        return nn.Sequential(_Embed(self), *self.blocks[:k]), nn.Sequential(*self.blocks[k:], _Classify(self))


class _Embed(nn.Module):
    """:meth:`SmallViT.embed` as a module of the ViT's own embedding layers (for :meth:`SmallViT.split`)."""

    def __init__(self, vit: SmallViT) -> None:
        super().__init__()
        self.image_size = vit.image_size
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed

    forward = SmallViT.embed


class _Classify(nn.Module):
    """:meth:`SmallViT.classify` as a module of the ViT's own final norm and head."""

    def __init__(self, vit: SmallViT) -> None:
        super().__init__()
        self.norm, self.head = vit.norm, vit.head

    forward = SmallViT.classify
