"""DINOv2 ViT/14 encoder (docs/method.md §2.2).

Parameter names are those of ``facebookresearch/dinov2``'s ``DinoVisionTransformer``
(``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}``, ``norm``), so the
released ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` files load with no key missing or left
over. The math follows the hub models: LayerNorm eps 1e-6, LayerScale, GELU MLP (SwiGLU for
g), bicubic position-embedding interpolation to the input's patch grid (while an exporter traces
the encoder, the same resampling as two matrices built from the traced grid, so that an exported
model follows the input's size).
"""

from __future__ import annotations

import logging
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
    "DinoVisionTransformer",
    "ViTSize",
    "bicubic_matrix",
    "build_dinov2",
    "load_dinov2_weights",
]

logger = logging.getLogger(__name__)

PATCH_SIZE = 14
_IMG_SIZE = 518  # the pretraining resolution: pos_embed holds 37x37 patch positions
_LN_EPS = 1e-6


@dataclass(frozen=True)
class ViTSize:
    """One released DINOv2 size and the blocks its DPT head reads."""

    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" or "swiglu"
    out_indices: tuple[int, int, int, int]


DINOV2_SIZES: dict[str, ViTSize] = {
    "s": ViTSize(384, 12, 6, "mlp", (2, 5, 8, 11)),
    "b": ViTSize(768, 12, 12, "mlp", (2, 5, 8, 11)),
    "l": ViTSize(1024, 24, 16, "mlp", (4, 11, 17, 23)),
    "g": ViTSize(1536, 40, 24, "swiglu", (9, 19, 29, 39)),
    # Not a released model: the shape of the official code's tiny test model, for tests and
    # CPU smoke runs (no pretrained file exists for it).
    "tiny": ViTSize(48, 4, 3, "mlp", (0, 1, 2, 3)),
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


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, length, dim = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
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


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward of ViT-g: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``.

    The hidden width is 2/3 of the MLP's, rounded up to a multiple of 8 (4096 for g), as the
    official fused layer computes it.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``gamma``."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both residual branches."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, ffn: str, init_values: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        hidden = int(dim * mlp_ratio)
        if ffn == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden)
        elif ffn == "swiglu":
            self.mlp = SwiGLUFFN(dim, hidden)
        else:
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = tokens + self.ls1(self.attn(self.norm1(tokens)))
        return tokens + self.ls2(self.mlp(self.norm2(tokens)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT encoder; ``forward(x)`` returns the normed patch tokens of ``out_indices``.

    ``interpolate_offset`` and ``interpolate_antialias`` select how ``pos_embed`` is resized to
    the input's patch grid: the plain hub models use ``0.1`` and no antialias, the ``_reg4``
    models ``0.0`` and antialias (see :meth:`interpolate_pos_encoding`).
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
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        # Default: the last four blocks (the named sizes pass their own).
        self.out_indices = tuple(out_indices) if out_indices is not None else tuple(
            range(max(depth - 4, 0), depth)
        )
        if any(not 0 <= i < depth for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} outside blocks 0..{depth - 1}")

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens
            else None
        )
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn, init_values) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        # Used only by masked-image pretraining; kept so the released files load key-exactly,
        # frozen because segmentation never reads it (DDP would flag it as unused otherwise).
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """The official initialisation (matters only when no pretrained file is loaded)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def patch_grid(self, x: Tensor) -> tuple[int, int]:
        """``(rows, cols)`` of patches for an image batch ``x``."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

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

    def _run_block(self, block: nn.Module, tokens: Tensor) -> Tensor:
        if self.checkpoint_blocks and torch.is_grad_enabled():
            return checkpoint(block, tokens, use_reentrant=False)
        return block(tokens)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        norm: bool = True,
        return_class_token: bool = False,
    ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """The outputs of blocks ``n`` (an int: the last ``n`` blocks) as ``[B, N, D]`` patch
        tokens, class and register tokens dropped, each passed through the final ``norm`` when
        ``norm``; with ``return_class_token``, ``(patch_tokens, class_token [B, D])`` pairs."""
        depth = self.depth
        taken = range(depth - n, depth) if isinstance(n, int) else tuple(n)
        if not taken or any(not 0 <= i < depth for i in taken):
            raise ValueError(f"blocks to take {tuple(taken)} outside 0..{depth - 1}")
        tokens = self.prepare_tokens(x)
        outputs: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            tokens = self._run_block(block, tokens)
            if i in taken:
                outputs.append(self.norm(tokens) if norm else tokens)
            if i == max(taken):  # later blocks cannot change the outputs
                break
        first_patch = 1 + self.num_register_tokens
        patch_tokens = [out[:, first_patch:] for out in outputs]
        if return_class_token:
            return tuple((p, out[:, 0]) for p, out in zip(patch_tokens, outputs))
        return tuple(patch_tokens)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Normed patch tokens ``[B, rows * cols, D]`` of the blocks in ``out_indices``."""
        return list(self.get_intermediate_layers(x, self.out_indices, norm=True))


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


def load_dinov2_weights(
    encoder: DinoVisionTransformer, path: str | os.PathLike[str]
) -> LoadReport:
    """Load an official ``dinov2_vit*14[_reg4]_pretrain.pth`` (or the ``backbone.*`` part of a
    full segmentation checkpoint) key-exactly; any missing, unexpected or mis-shaped key raises
    :class:`~dssn.models.weights.WeightsError` naming it, before anything is copied."""
    report = load_backbone_weights(encoder, path)
    logger.info("loaded %d DINOv2 tensors from %s", report.loaded, path)
    return report
