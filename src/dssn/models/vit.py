"""DINOv2 ViT/14 and DINOv3 ViT/16 encoders: one ViT family with two position schemes
(docs/method.md §2.2, §2.5).

:class:`VisionTransformer` holds what both share (patch embedding, class and extra tokens,
pre-norm blocks with LayerScale, the final norm, intermediate outputs, checkpointing);
:class:`DinoVisionTransformer` (DINOv2) adds a learned, bicubically resized ``pos_embed``;
:class:`DinoV3VisionTransformer` (DINOv3) rotary embeddings of the patch tokens' coordinates
(:class:`RopePositionEmbedding`) and ``storage_tokens``.

DINOv2: parameter names are those of ``facebookresearch/dinov2``'s ``DinoVisionTransformer``
(``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}``, ``norm``), so the
released ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` files load with no key missing or left
over. The math follows the hub models: LayerNorm eps 1e-6, LayerScale, GELU MLP (SwiGLU for
g), bicubic position-embedding interpolation to the input's patch grid (while an exporter traces
the encoder, the same resampling as two matrices built from the traced grid, so that an exported
model follows the input's size).

DINOv3: the names and math of ``facebookresearch/dinov3``'s ``DinoVisionTransformer`` as its hub
builds the released backbones (docs/method.md §2.5): patch 16, 4 storage tokens, RoPE on q and k of the
patch tokens in float32, a qkv bias whose k third is zeroed by ``attn.qkv.bias_mask``, LayerNorm
eps 1e-5, GELU MLP or SwiGLU (``mlp.w1``, ``mlp.w2``, ``mlp.w3``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dssn.models.weights import LoadReport, load_backbone_weights

__all__ = [
    "DINOV2_SIZES",
    "DINOV3_SIZES",
    "ENCODERS",
    "DinoV3VisionTransformer",
    "DinoVisionTransformer",
    "RopePositionEmbedding",
    "ViTSize",
    "VisionTransformer",
    "bicubic_matrix",
    "build_dinov2",
    "build_dinov3",
    "build_encoder",
    "encoder_size",
    "load_dinov2_weights",
    "load_encoder_weights",
]

PATCH_SIZE = 14
_IMG_SIZE = 518  # the pretraining resolution: pos_embed holds 37x37 patch positions
_LN_EPS = 1e-6
V3_PATCH_SIZE = 16
_V3_LN_EPS = 1e-5
_V3_STORAGE_TOKENS = 4
_V3_ROPE_BASE = 100.0


@dataclass(frozen=True)
class ViTSize:
    """One released encoder size, the blocks its DPT head reads and the head's width class."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" or "swiglu"
    out_indices: tuple[int, int, int, int]
    head: str = ""  # the DPT width class (dssn.models.dpt.DPT_WIDTHS); "" means the size's own key
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    swiglu_align: int = 8  # SwiGLU hidden width rounded up to a multiple of this
    local_cls_norm: bool = False  # a training-only norm the 7B and satellite files carry


DINOV2_SIZES: dict[str, ViTSize] = {
    "s": ViTSize(384, 12, 6, "mlp", (2, 5, 8, 11)),
    "b": ViTSize(768, 12, 12, "mlp", (2, 5, 8, 11)),
    "l": ViTSize(1024, 24, 16, "mlp", (4, 11, 17, 23)),
    "g": ViTSize(1536, 40, 24, "swiglu", (9, 19, 29, 39)),
    # Not a released model: the shape of the official code's tiny test model, for tests and
    # CPU smoke runs (no pretrained file exists for it).
    "tiny": ViTSize(48, 4, 3, "mlp", (0, 1, 2, 3)),
}

# The hub's dinov3_vit{s,s+,b,l,h+,7b}16 (docs/method.md §2.5); out_indices as DINOv3's own dense heads.
DINOV3_SIZES: dict[str, ViTSize] = {
    "s": ViTSize(384, 12, 6, "mlp", (2, 5, 8, 11), head="s"),
    "splus": ViTSize(384, 12, 6, "swiglu", (2, 5, 8, 11), head="s", mlp_ratio=6.0),
    "b": ViTSize(768, 12, 12, "mlp", (2, 5, 8, 11), head="b"),
    "l": ViTSize(1024, 24, 16, "mlp", (4, 11, 17, 23), head="l"),
    # The satellite (SAT-493M) ViT-L: the same network plus its file's local_cls_norm.
    "l_sat": ViTSize(1024, 24, 16, "mlp", (4, 11, 17, 23), head="l", local_cls_norm=True),
    "hplus": ViTSize(1280, 32, 20, "swiglu", (7, 15, 23, 31), head="g", mlp_ratio=6.0),
    "7b": ViTSize(4096, 40, 32, "swiglu", (9, 19, 29, 39), head="g", mlp_ratio=3.0, qkv_bias=False,
                  swiglu_align=64, local_cls_norm=True),
    # Not released: the shape of reference/dinov3's tiny official models, for tests and CPU runs.
    "tiny": ViTSize(64, 4, 4, "mlp", (0, 1, 2, 3), head="tiny"),
}

# model.backbone names of the ViT encoders -> (family, size).
ENCODERS: dict[str, tuple[str, str]] = {
    **{f"dinov2_{size}": ("dinov2", size) for size in DINOV2_SIZES},
    **{f"dinov3_{size}": ("dinov3", size) for size in DINOV3_SIZES},
}


def _cubic(distance: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at ``distance`` (zero from 2 on)."""
    x = distance.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(
    out_size: int | Tensor, in_size: int, in_per_out: float | Tensor, antialias: bool
) -> Tensor:
    """``[out_size, in_size]`` weights of PyTorch's bicubic resampling along one axis
    (``align_corners=False``); ``in_per_out`` is the input step per output pixel (``1 / scale``).

    Without antialias: A = -0.75, four taps clamped at the borders (``upsample_bicubic2d``).
    With antialias: A = -0.5 stretched by ``max(in_per_out, 1)``, truncated at the borders and
    normalised (``_upsample_bicubic2d_aa``). Every step is a tensor op, so a traced ``out_size``
    stays symbolic in an exported graph.
    """
    step = torch.as_tensor(in_per_out, dtype=torch.float32)
    out_pos = torch.arange(out_size).to(torch.float32) + 0.5
    sources = torch.arange(in_size, dtype=torch.float32)
    if antialias:
        center = (out_pos * step).unsqueeze(1)
        weights = _cubic((sources.unsqueeze(0) - center + 0.5) / step.clamp(min=1.0), -0.5)
        return weights / weights.sum(dim=1, keepdim=True)
    real = out_pos * step - 0.5
    taps = real.floor().unsqueeze(1) + torch.arange(-1, 3, dtype=torch.float32)  # [out, 4]
    weights = _cubic(real.unsqueeze(1) - taps, -0.75)
    clamped = taps.clamp(0, in_size - 1)
    one_hot = (clamped.unsqueeze(2) == sources).to(torch.float32)  # [out, 4, in]
    return (weights.unsqueeze(2) * one_hot).sum(dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution, flattened to tokens ``[B, N, D]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"input {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class LinearKMaskedBias(nn.Linear):
    """DINOv3's qkv projection: its bias is multiplied by the buffer ``bias_mask`` (ones for q
    and v, zeros for k; a buffer so that the released files, which hold it, load key-exactly)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        mask = torch.ones(out_features)
        mask[out_features // 3 : 2 * out_features // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the last ``len(sin)`` tokens of ``x`` ``[B, heads, N, D_h]`` (the patches; the
    class and storage tokens before them stay as they are), in the tables' float32."""
    sin, cos = rope
    prefix = x.shape[-2] - sin.shape[-2]
    patches = x[..., prefix:, :].to(sin.dtype)
    rotated = (patches * cos + _rotate_half(patches) * sin).to(x.dtype)
    return torch.cat([x[..., :prefix, :], rotated], dim=-2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection; with ``rope`` tables the patch
    tokens' q and k are rotated first (DINOv3). ``mask_k_bias``: DINOv3's zero k bias."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, mask_k_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = (LinearKMaskedBias(dim, dim * 3) if qkv_bias and mask_k_bias
                    else nn.Linear(dim, dim * 3, bias=qkv_bias))
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, tokens: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        if rope is not None:
            query, key = apply_rope(query, rope), apply_rope(key, rope)
        mixed = F.scaled_dot_product_attention(query, key, value)
        return self.proj(mixed.transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _swiglu_width(hidden: int, align: int) -> int:
    """2/3 of the MLP's hidden width, rounded up to a multiple of ``align``, as both releases."""
    return -(-int(hidden * 2 / 3) // align) * align


class SwiGLUFFNFused(nn.Module):
    """DINOv2-g's SwiGLU: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)`` (4096 hidden for g)."""

    def __init__(self, dim: int, hidden: int, align: int = 8) -> None:
        super().__init__()
        hidden = _swiglu_width(hidden, align)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class SwiGLUFFN(nn.Module):
    """DINOv3's SwiGLU, the same function with separate ``w1`` (gate) and ``w2`` (value)."""

    def __init__(self, dim: int, hidden: int, align: int = 8) -> None:
        super().__init__()
        hidden = _swiglu_width(hidden, align)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``gamma``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma



class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches; ``mlp`` is the
    feed-forward module (its class names its keys: ``Mlp``, ``SwiGLUFFNFused`` or ``SwiGLUFFN``)."""

    def __init__(
        self, dim: int, num_heads: int, mlp: nn.Module, init_values: float, *, eps: float = _LN_EPS,
        qkv_bias: bool = True, mask_k_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, mask_k_bias)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, tokens: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        tokens = tokens + self.ls1(self.attn(self.norm1(tokens), rope))
        return tokens + self.ls2(self.mlp(self.norm2(tokens)))


def _ffn(ffn: str, dim: int, mlp_ratio: float, align: int, fused: bool) -> nn.Module:
    hidden = int(dim * mlp_ratio)
    if ffn == "mlp":
        return Mlp(dim, hidden)
    if ffn == "swiglu":
        return (SwiGLUFFNFused if fused else SwiGLUFFN)(dim, hidden, align)
    raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")


class VisionTransformer(nn.Module):
    """What DINOv2 and DINOv3 share; ``forward(x)`` returns the normed patch tokens
    ``[B, rows * cols, D]`` of the blocks in ``out_indices``.

    Tokens run as ``[cls, extra tokens..., patches...]`` (``num_register_tokens`` extra tokens:
    DINOv2's registers, DINOv3's storage tokens). A subclass says how positions enter in
    :meth:`embed`: added to the tokens (DINOv2), or rotary tables every block applies (DINOv3).
    """

    checkpoint_blocks: bool = False
    """Activation checkpointing per block while gradients are on: the blocks' activations are
    recomputed in the backward pass instead of stored. Outputs and gradients are unchanged."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        *,
        patch_size: int,
        in_chans: int,
        mlp_ratio: float,
        ffn: str,
        init_values: float,
        num_register_tokens: int,
        out_indices: Sequence[int] | None,
        eps: float,
        qkv_bias: bool = True,
        mask_k_bias: bool = False,
        swiglu_align: int = 8,
        fused_swiglu: bool = True,
    ) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        # Default: the last four blocks (the named sizes pass their own).
        self.out_indices = tuple(out_indices) if out_indices is not None else tuple(
            range(max(depth - 4, 0), depth)
        )
        if any(not 0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} outside blocks 0..{depth - 1}")

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, _ffn(ffn, embed_dim, mlp_ratio, swiglu_align, fused_swiglu),
                  init_values, eps=eps, qkv_bias=qkv_bias, mask_k_bias=mask_k_bias)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        # Used only by masked-image pretraining; kept so the released files load key-exactly,
        # frozen because segmentation never reads it (DDP would flag it as unused otherwise).
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)

    def _init_linears(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def patch_grid(self, x: Tensor) -> tuple[int, int]:
        """``(rows, cols)`` of patches for an image batch ``x``."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """``(tokens [B, 1 + extra + rows * cols, D], rotary (sin, cos) tables or None)``."""
        raise NotImplementedError

    def _run_block(self, block: nn.Module, tokens: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(block, tokens, rope, use_reentrant=False)
        return block(tokens, rope)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        norm: bool = True,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, ...], ...]:
        """The outputs of blocks ``n`` (an int: the last ``n`` blocks) as ``[B, N, D]`` patch
        tokens, class and extra tokens dropped, each passed through the final ``norm`` when
        ``norm``. With ``return_class_token`` / ``return_extra_tokens``, tuples per block of
        ``(patch_tokens, class_token [B, D], extra_tokens [B, extra, D])`` (those asked for, in
        this order), as the official code returns them."""
        depth = self.depth
        taken = range(depth - n, depth) if isinstance(n, int) else tuple(n)
        if not taken or any(not 0 <= i < depth for i in taken):
            raise ValueError(f"blocks to take {tuple(taken)} outside 0..{depth - 1}")
        tokens, rope = self.embed(x)
        outputs: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            tokens = self._run_block(block, tokens, rope)
            if i in taken:
                outputs.append(self.norm(tokens) if norm else tokens)
            if i == max(taken):  # later blocks cannot change the outputs
                break
        first_patch = 1 + self.num_register_tokens
        columns = [[out[:, first_patch:] for out in outputs]]
        if return_class_token:
            columns.append([out[:, 0] for out in outputs])
        if return_extra_tokens:
            columns.append([out[:, 1:first_patch] for out in outputs])
        return tuple(columns[0]) if len(columns) == 1 else tuple(zip(*columns))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normed patch tokens ``[B, rows * cols, D]`` of the blocks in ``out_indices``."""
        return list(self.get_intermediate_layers(x, self.out_indices, norm=True))


class DinoVisionTransformer(VisionTransformer):
    """DINOv2 ViT encoder: learned ``pos_embed`` for the 518-pixel grid, resized to the input's.

    ``interpolate_offset`` and ``interpolate_antialias`` select how ``pos_embed`` is resized to
    the input's patch grid: the plain hub models use ``0.1`` and no antialias, the ``_reg4``
    models ``0.0`` and antialias (see :meth:`interpolate_pos_encoding`).
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        *,
        patch_size: int = PATCH_SIZE,
        img_size: int = _IMG_SIZE,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        init_values: float = 1.0,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        super().__init__(
            embed_dim, depth, num_heads, patch_size=patch_size, in_chans=in_chans, mlp_ratio=mlp_ratio,
            ffn=ffn, init_values=init_values, num_register_tokens=num_register_tokens,
            out_indices=out_indices, eps=_LN_EPS,
        )
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens
            else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation (matters only when no pretrained file is loaded)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self._init_linears()

    def interpolate_pos_encoding(self, patch_grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """``pos_embed`` (class position + patch positions) resized to ``patch_grid``.

        Bicubic in float32. With a non-zero offset the official code passes
        ``scale_factor=((rows + offset) / M, (cols + offset) / M)`` for the ``M x M`` pretraining
        grid (the offset guards the floor of ``M * scale`` against rounding down); with offset 0
        it passes the output size. The two differ numerically, hence both paths.
        """
        if torch.jit.is_tracing():  # F.interpolate cannot take a traced scale factor
            return self._traced_pos_encoding(patch_grid, dtype)
        rows, cols = patch_grid
        num_positions = self.pos_embed.shape[1] - 1
        if rows * cols == num_positions and rows == cols:
            return self.pos_embed
        side = int(math.sqrt(num_positions))
        pos_embed = self.pos_embed.float()
        class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            offset = self.interpolate_offset
            resize = {"scale_factor": ((rows + offset) / side, (cols + offset) / side)}
        else:
            resize = {"size": (rows, cols)}
        patch_pos = F.interpolate(
            patch_pos, mode="bicubic", antialias=self.interpolate_antialias, **resize
        )
        if patch_pos.shape[-2:] != (rows, cols):
            raise RuntimeError(
                f"position embeddings resized to {tuple(patch_pos.shape[-2:])}, "
                f"expected {(rows, cols)}"
            )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([class_pos, patch_pos], dim=1).to(dtype)

    def _traced_pos_encoding(
        self, patch_grid: tuple[int | Tensor, int | Tensor], dtype: torch.dtype
    ) -> Tensor:
        """:meth:`interpolate_pos_encoding` as ``rows_matrix @ grid @ cols_matrix.T``
        (:func:`bicubic_matrix`), the grid's sides possibly traced tensors; the pretraining
        grid itself passes unchanged, as in eager mode."""
        rows, cols = (torch.as_tensor(n) for n in patch_grid)
        num_positions = self.pos_embed.shape[1] - 1
        side = int(math.sqrt(num_positions))
        pos_embed = self.pos_embed.float()
        class_pos = pos_embed[:, :1]
        patch_pos = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        unchanged = (rows == side) & (cols == side)
        matrices = []
        for out_size in (rows, cols):
            stretch = side / (out_size.to(torch.float32) + self.interpolate_offset)
            resample = bicubic_matrix(out_size, side, stretch, self.interpolate_antialias)
            # [out, side] either way, so that the choice is a plain select in the graph
            identity = (torch.arange(out_size).unsqueeze(1) == torch.arange(side)).to(torch.float32)
            matrices.append(torch.where(unchanged, identity, resample))
        patch_pos = matrices[0] @ patch_pos @ matrices[1].transpose(0, 1)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, patch_pos.shape[1])
        return torch.cat([class_pos, patch_pos], dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """``[cls, registers..., patches...]`` with positions added (registers have none)."""
        patches = self.patch_embed(x)
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(self.patch_grid(x), tokens.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def embed(self, x: Tensor) -> tuple[Tensor, None]:
        return self.prepare_tokens(x), None


class RopePositionEmbedding(nn.Module):
    """DINOv3's rotary tables for a ``rows x cols`` patch grid (docs/method.md §2.5), in float32.

    Coordinates are patch centres normalised to [-1, 1] per axis ("separate"); each of the
    ``head_dim / 4`` periods turns them into an angle, rows' angles then columns', tiled twice
    to ``head_dim``. ``rescale`` (DINOv3's ``rescale_coords``, a pre-training augmentation):
    in training mode, in a forward with gradients, the coordinates are multiplied by one
    log-uniform factor in ``[1 / rescale, rescale]`` per forward; None (the default here) never.
    """

    def __init__(self, head_dim: int, base: float = _V3_ROPE_BASE, rescale: float | None = None) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"the head width {head_dim} is not a multiple of 4, as RoPE on 2 axes needs")
        if rescale is not None and rescale < 1:
            raise ValueError(f"rope rescale must be >= 1 (a range [1/r, r]), got {rescale}")
        self.rescale = rescale
        quarter = head_dim // 4
        periods = base ** (2 * torch.arange(quarter, dtype=torch.float32) / (head_dim // 2))
        self.register_buffer("periods", periods)

    def forward(self, rows: int, cols: int) -> tuple[Tensor, Tensor]:
        """``(sin, cos)``, each ``[rows * cols, head_dim]`` float32."""
        where = {"device": self.periods.device, "dtype": torch.float32}
        coords_rows = torch.arange(0.5, rows, **where) / rows
        coords_cols = torch.arange(0.5, cols, **where) / cols
        coords = torch.stack(torch.meshgrid(coords_rows, coords_cols, indexing="ij"), dim=-1).flatten(0, 1)
        coords = 2.0 * coords - 1.0  # [HW, 2]
        # Only in passes that train the network: an EMA teacher left in training mode (DSSN's
        # first epoch) predicts its pseudo labels under no_grad, at the true positions.
        if self.training and self.rescale is not None and torch.is_grad_enabled():
            log_range = math.log(self.rescale)
            coords = coords * torch.empty(1, **where).uniform_(-log_range, log_range).exp()
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]
        angles = angles.flatten(1, 2).tile(2)  # [HW, head_dim]
        return torch.sin(angles), torch.cos(angles)


class DinoV3VisionTransformer(VisionTransformer):
    """DINOv3 ViT encoder (docs/method.md §2.5): no absolute positions; every block rotates the patch
    tokens' q and k by :class:`RopePositionEmbedding`'s tables. ``rope_rescale``: the
    pre-training coordinate rescale, in training mode only; off (None) by default.
    ``local_cls_norm``: the 7B and satellite files' training-only norm, built (frozen) so that
    they load key-exactly; inference never uses it."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        *,
        patch_size: int = V3_PATCH_SIZE,
        in_chans: int = 3,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        init_values: float = 1.0,
        num_storage_tokens: int = _V3_STORAGE_TOKENS,
        qkv_bias: bool = True,
        swiglu_align: int = 8,
        rope_base: float = _V3_ROPE_BASE,
        rope_rescale: float | None = None,
        local_cls_norm: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            embed_dim, depth, num_heads, patch_size=patch_size, in_chans=in_chans, mlp_ratio=mlp_ratio,
            ffn=ffn, init_values=init_values, num_register_tokens=num_storage_tokens,
            out_indices=out_indices, eps=_V3_LN_EPS, qkv_bias=qkv_bias, mask_k_bias=True,
            swiglu_align=swiglu_align, fused_swiglu=False,
        )
        self.storage_tokens = (
            nn.Parameter(torch.zeros(1, num_storage_tokens, embed_dim)) if num_storage_tokens else None
        )
        self.rope_embed = RopePositionEmbedding(embed_dim // num_heads, rope_base, rope_rescale)
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=_V3_LN_EPS) if local_cls_norm else None
        if self.local_cls_norm is not None:
            self.local_cls_norm.requires_grad_(False)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation (matters only when no pretrained file is loaded)."""
        nn.init.normal_(self.cls_token, std=0.02)
        if self.storage_tokens is not None:
            nn.init.normal_(self.storage_tokens, std=0.02)
        self._init_linears()

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``[cls, storage..., patches...]`` and the rotary tables of the patch grid."""
        patches = self.patch_embed(x)
        prefix = [self.cls_token.expand(patches.shape[0], -1, -1)]
        if self.storage_tokens is not None:
            prefix.append(self.storage_tokens.expand(patches.shape[0], -1, -1))
        return torch.cat([*prefix, patches], dim=1), self.rope_embed(*self.patch_grid(x))


def build_dinov2(size: str, registers: int = 0) -> DinoVisionTransformer:
    """The hub's ``dinov2_vit{size}14`` (``registers=0``) or ``..._reg4`` (``registers=4``)."""
    if size not in DINOV2_SIZES:
        raise ValueError(f"unknown DINOv2 size {size!r}; choose one of {sorted(DINOV2_SIZES)}")
    if registers not in (0, 4):
        raise ValueError(f"DINOv2 was released with 0 or 4 registers, got {registers}")
    spec = DINOV2_SIZES[size]
    return DinoVisionTransformer(
        spec.embed_dim,
        spec.depth,
        spec.num_heads,
        ffn=spec.ffn,
        num_register_tokens=registers,
        # The register models were trained with these interpolation settings.
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=bool(registers),
        out_indices=spec.out_indices,
    )


def build_dinov3(size: str, rope_rescale: float | None = None) -> DinoV3VisionTransformer:
    """The hub's ``dinov3_vit{size}16`` (``l_sat``: the satellite ViT-L)."""
    if size not in DINOV3_SIZES:
        raise ValueError(f"unknown DINOv3 size {size!r}; choose one of {sorted(DINOV3_SIZES)}")
    spec = DINOV3_SIZES[size]
    return DinoV3VisionTransformer(
        spec.embed_dim, spec.depth, spec.num_heads, mlp_ratio=spec.mlp_ratio, ffn=spec.ffn,
        qkv_bias=spec.qkv_bias, swiglu_align=spec.swiglu_align, rope_rescale=rope_rescale,
        local_cls_norm=spec.local_cls_norm, out_indices=spec.out_indices,
    )


def build_encoder(name: str, registers: int = 0, rope_rescale: float | None = None) -> VisionTransformer:
    """The encoder ``model.backbone`` names (``dinov2_b``, ``dinov3_s``, ...; see ``ENCODERS``).
    ``registers`` is DINOv2's, ``rope_rescale`` DINOv3's; each refuses the other family."""
    if name not in ENCODERS:
        raise ValueError(f"unknown ViT encoder {name!r}; choose one of {sorted(ENCODERS)}")
    family, size = ENCODERS[name]
    if family == "dinov2":
        if rope_rescale is not None:
            raise ValueError(f"rope_rescale is for the DINOv3 encoders; {name} has learned positions")
        return build_dinov2(size, registers)
    if registers:
        raise ValueError(f"registers={registers} is for DINOv2; {name} has its own 4 storage tokens")
    return build_dinov3(size, rope_rescale)


def encoder_size(name: str) -> ViTSize:
    """The :class:`ViTSize` of an encoder name."""
    family, size = ENCODERS[name]
    return (DINOV2_SIZES if family == "dinov2" else DINOV3_SIZES)[size]


def load_encoder_weights(encoder: VisionTransformer, path: str | os.PathLike[str]) -> LoadReport:
    """Load an encoder's weights key-exactly, in any form users have them (docs/training.md, encoder weights): an
    official ``dinov2_vit*14[_reg4]_pretrain.pth`` or ``dinov3_vit*16_pretrain_*.pth``, the
    ``backbone.*`` part of a full segmentation checkpoint, or the ``transformers`` layout
    (``model.safetensors`` / ``pytorch_model.bin`` or their folder, with or without a task
    model's prefix), converted exactly. Any missing, unexpected or mis-shaped key raises
    :class:`~dssn.models.weights.WeightsError` naming it, before anything is copied; the log
    says which form was found and what was converted."""
    return load_backbone_weights(encoder, path)


load_dinov2_weights = load_encoder_weights  # the name before DINOv3 arrived
