"""Transformer building blocks of CLIP's towers: attention through scaled_dot_product_attention, fp32 LayerNorm,
the vision transformer. Parameter names follow OpenCLIP's (and so OpenAI's) so that state dicts interchange.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose statistics are always computed in fp32, with the result cast back to the input dtype.

    Under bf16/fp16 autocast or with low-precision weights, a low-precision LayerNorm loses the small
    differences around a large mean that the residual stream carries; fp32 math keeps them.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        # autocast is switched off so that nothing downcasts the fp32 inputs behind our back.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP weights (and LAION-400M's) were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (packed in_proj, out_proj)
    but computed by F.scaled_dot_product_attention, which picks a fused kernel when one applies."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [batch, length, 3 * width] -> 3 x [batch, heads, length, head_dim]
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        x = x.transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(x)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act_layer: type[nn.Module]):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = act_layer()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ls_1 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), act_layer)
        self.ls_2 = LayerScale(width, ls_init_value) if ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), is_causal=is_causal))
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return x


class Transformer(nn.Module):
    """A stack of residual attention blocks on [batch, length, width] tokens."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, ls_init_value, act_layer) for _ in range(layers)]
        )

    def get_cast_dtype(self) -> torch.dtype:
        """The dtype of the block weights, to which inputs are cast (they differ under 'bf16'/'fp16' precision)."""
        return self.resblocks[0].mlp.c_fc.weight.dtype

    def init_parameters(self) -> None:
        # OpenAI's init: residual-branch outputs shrink with depth so the stream's variance stays bounded.
        attn_std = self.width**-0.5
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, is_causal, use_reentrant=False)
            else:
                x = block(x, is_causal=is_causal)
        return x


def _pair(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class VisionTransformer(nn.Module):
    """ViT image tower: patch embedding, class token, pre-norm transformer, ln_post, linear projection."""

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        patch_dropout: float = 0.0,
        no_ln_pre: bool = False,
        pool_type: str = "tok",
        final_ln_after_pool: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        if pool_type not in ("tok", "avg"):
            raise ValueError(f"vision pool_type must be 'tok' or 'avg', got {pool_type!r}")
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
        self.image_size = _pair(image_size)
        self.patch_size = _pair(patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.output_dim = output_dim
        self.pool_type = pool_type
        self.final_ln_after_pool = final_ln_after_pool
        self.patch_dropout = patch_dropout

        self.conv1 = nn.Conv2d(3, width, kernel_size=self.patch_size, stride=self.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        num_positions = self.grid_size[0] * self.grid_size[1] + 1
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_positions, width))
        self.ln_pre = nn.Identity() if no_ln_pre else LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, ls_init_value, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        # FLIP-style patch dropout: train on a random subset of patch tokens; the class token always stays.
        batch, num_patches = x.shape[0], x.shape[1] - 1
        keep = max(1, int(num_patches * (1.0 - self.patch_dropout)))
        kept = torch.rand(batch, num_patches, device=x.device).argsort(dim=1)[:, :keep] + 1
        index = torch.cat([torch.zeros(batch, 1, dtype=kept.dtype, device=x.device), kept], dim=1)
        return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [batch, width, grid_h, grid_w]
        x = x.flatten(2).transpose(1, 2)  # [batch, grid_h * grid_w, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.training and self.patch_dropout > 0.0:
            x = self._drop_patches(x)
        x = self.ln_pre(x)
        x = self.transformer(x)
        if self.pool_type == "tok":
            # LayerNorm is per token, so normalising only the class token equals normalising all then pooling.
            pooled = self.ln_post(x[:, 0])
        elif self.final_ln_after_pool:
            pooled = self.ln_post(x[:, 1:].mean(dim=1))
        else:
            pooled = self.ln_post(x[:, 1:]).mean(dim=1)
        return pooled @ self.proj
