"""The Hugging Face ``transformers`` layout of DINOv2, DINOv2-with-registers and DINOv3, converted
to the official names (docs/training.md, encoder weights, docs/training.md "Encoder weights").

``Dinov2Model``, ``Dinov2WithRegistersModel`` and ``DINOv3ViTModel`` store the same tensors as
the official releases under other names, with q, k and v as separate projections. The
conversion is exact (renames, one concatenation, reshapes that keep every value); what the
layout does not store is taken from the model being loaded into and listed: DINOv3's RoPE
``periods`` and ``bias_mask`` (constants of the architecture) and its k bias (zero by design).
Both the names of ``transformers`` 4.x (``attention.attention.query``, ``attention.output.dense``)
and 5.x (``attention.q_proj``, ``attention.o_proj``) are read. Keys outside the encoder (a task
model's ``classifier.*``) are left out and listed; anything else unrecognised is kept under its
own name, so that the load refuses it by name instead of dropping it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Conversion", "convert_transformers", "is_transformers_layout"]

_CLS = "embeddings.cls_token"
_BLOCK = re.compile(r"^(?:encoder\.layer|model\.layer|layer)\.(\d+)\.(.+)$")
_QKV = re.compile(r"^attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_IN_BLOCK = {
    "norm1": "norm1", "norm2": "norm2",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",  # DINOv2-g's fused SwiGLU
}
# DINOv3's feed-forward: gated (S+, H+, 7B) or plain (S, B, L), told apart by gate_proj.
_GATED = {"mlp.gate_proj": "mlp.w1", "mlp.up_proj": "mlp.w2", "mlp.down_proj": "mlp.w3"}
_PLAIN = {"mlp.up_proj": "mlp.fc1", "mlp.down_proj": "mlp.fc2"}


@dataclass
class Conversion:
    """What :func:`convert_transformers` did, for the load's log line."""

    prefix: str = ""
    """The task model's prefix the encoder sat under (``dinov2.``, ``dinov3.``, ...)."""
    renamed: int = 0
    joined_qkv: int = 0
    """Blocks whose separate q/k/v projections were concatenated into ``qkv``."""
    zero_k_bias: int = 0
    """Blocks whose missing k bias was filled with zeros (DINOv3 has none)."""
    from_model: list[str] = field(default_factory=list)
    """Keys the layout does not store, taken from the model (constant buffers)."""
    left_out: list[str] = field(default_factory=list)
    """Keys outside the encoder (a task head), not loaded."""

    def summary(self) -> str:
        parts = [f"{self.renamed} tensors renamed to the official names",
                 f"q/k/v joined into qkv in {self.joined_qkv} blocks"]
        if self.prefix:
            parts.insert(0, f"task-model prefix '{self.prefix}' removed")
        if self.zero_k_bias:
            parts.append(f"zero k bias in {self.zero_k_bias} blocks")
        if self.from_model:
            shown = ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", k) for k in self.from_model}))
            parts.append(f"{len(self.from_model)} buffers not stored in this layout taken from the model ({shown})")
        if self.left_out:
            parts.append(f"{len(self.left_out)} keys outside the encoder left out ({', '.join(self.left_out[:5])})")
        return "; ".join(parts)


def is_transformers_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` holds a ``transformers`` DINO encoder (its class token's name)."""
    return any(key == _CLS or key.endswith("." + _CLS) for key in state)


def _task_prefix(state: Mapping[str, Tensor]) -> str:
    return next(key[: -len(_CLS)] for key in state if key == _CLS or key.endswith("." + _CLS))


def convert_transformers(
    state: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], Conversion]:
    """``state`` (a ``transformers`` layout) under the official names of ``target``, the state
    dict of the encoder it will load into (which says register vs storage tokens, and holds the
    constant buffers the layout leaves out)."""
    info = Conversion(prefix=_task_prefix(state))
    tokens_name = "storage_tokens" if "storage_tokens" in target else "register_tokens"
    out: dict[str, Tensor] = {}
    blocks: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(info.prefix):
            info.left_out.append(key)
            continue
        name = key[len(info.prefix):]
        block = _BLOCK.match(name)
        if block:
            blocks.setdefault(int(block.group(1)), {})[block.group(2)] = value
        elif name == "embeddings.register_tokens":
            out[tokens_name] = value
            info.renamed += 1
        elif name in _TOP:
            out[_TOP[name]] = value
            info.renamed += 1
        else:
            out[name] = value  # unrecognised: the load names it as unexpected
    for index, parts in sorted(blocks.items()):
        out.update(_convert_block(index, parts, target, info))
    if "mask_token" in out and "mask_token" in target:  # DINOv3's [1, 1, D] -> the official [1, D]
        out["mask_token"] = out["mask_token"].reshape(target["mask_token"].shape)
    for key, value in target.items():
        if key not in out and (key == "rope_embed.periods" or key.endswith(".attn.qkv.bias_mask")):
            out[key] = value.clone()
            info.from_model.append(key)
    return out, info


def _convert_block(
    index: int, parts: dict[str, Tensor], target: Mapping[str, Tensor], info: Conversion
) -> dict[str, Tensor]:
    prefix = f"blocks.{index}."
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], Tensor] = {}
    ffn = _GATED if "mlp.gate_proj.weight" in parts else _PLAIN
    for name, value in parts.items():
        attention = _QKV.match(name)
        if attention:
            which = (attention.group(1) or attention.group(2))[0]  # query/q -> q, ...
            qkv[(which, attention.group(3))] = value
            continue
        module, _, leaf = name.rpartition(".")
        renamed = _IN_BLOCK.get(module) or ffn.get(module)
        if renamed is None and name in _IN_BLOCK:  # layer_scale*.lambda1 has no leaf of its own
            out[prefix + _IN_BLOCK[name]] = value
        elif renamed is None:
            out[prefix + name] = value  # unrecognised: the load names it as unexpected
            continue
        else:
            out[f"{prefix}{renamed}.{leaf}"] = value
        info.renamed += 1
    if qkv and not all((w, "weight") in qkv for w in "qkv"):  # incomplete: the load names what is there
        return {**out, **{f"{prefix}attention.{w}_proj.{leaf}": v for (w, leaf), v in qkv.items()}}
    if qkv:
        out[prefix + "attn.qkv.weight"] = torch.cat([qkv[(w, "weight")] for w in "qkv"])
        biases = {w for w, leaf in qkv if leaf == "bias"}
        if biases == {"q", "v"} and prefix + "attn.qkv.bias_mask" in target:
            qkv[("k", "bias")] = torch.zeros_like(qkv[("q", "bias")])  # masked to zero anyway
            info.zero_k_bias += 1
            biases.add("k")
        if biases == {"q", "k", "v"}:
            out[prefix + "attn.qkv.bias"] = torch.cat([qkv[(w, "bias")] for w in "qkv"])
        else:  # an incomplete set: kept under their own names, so that the load names them
            out.update({f"{prefix}attention.{w}_proj.bias": qkv[(w, "bias")] for w in biases})
        info.joined_qkv += 1
        info.renamed += len(qkv)
    return out
