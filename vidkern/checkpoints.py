"""Loading the original VideoMAE / MVD checkpoints (and vidkern's own) into vidkern ViTs:
``vidkern.models.load_checkpoint(model, path_or_state_dict)``.

Accepted formats:
- fine-tuning checkpoints: weights under ``model`` / ``module`` / ``state_dict`` (or at the top
  level), VideoMAE names (``patch_embed.proj.*``) or vidkern's (``patch_embed.*``);
- pre-training checkpoints: the encoder under ``encoder.``; the decoder (``decoder.*``,
  ``encoder_to_decoder.*``, ``mask_token``, ``decoder_pos_embed``) is ignored;
- DDP's ``module.`` prefix.
Learned position embeddings of another frame count or resolution are interpolated (spatial:
bicubic over the patch grid; temporal: linear over frames). A fixed sin-cos table in the
checkpoint is ignored (vidkern computes its own). Everything is checked before anything is
loaded, and every problem is reported in one message.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

_WRAPPERS = ("model", "module", "state_dict", "model_state")
_PREFIXES = ("module.", "encoder.")
_DECODER = ("decoder.", "encoder_to_decoder.", "mask_token", "decoder_pos_embed")
_RENAMES = (("patch_embed.proj.", "patch_embed."),)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did: key lists, and (key, checkpoint shape, model shape) for
    shape mismatches that were left at their initial values."""

    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    interpolated: list = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def show(keys, limit=12):
            keys = [str(k) for k in keys]
            return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
        parts = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "mismatched", "interpolated", "ignored"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} ({len(keys)}): {show(keys)}")
        return "; ".join(parts)


def _state_dict(checkpoint) -> dict:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a path or a dict of tensors, got {type(checkpoint).__name__}")
    for _ in range(3):   # {"model": {...}}, {"module": {"state_dict": ...}}, ...
        inner = next((checkpoint[k] for k in _WRAPPERS if isinstance(checkpoint.get(k), dict)), None)
        if inner is None:
            break
        checkpoint = inner
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def _normalise(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    for old, new in _RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
    return key


def _resize(key: str, value: torch.Tensor, target: torch.Tensor):
    """A learned position embedding resized to ``target``'s token count, or None if not one."""
    if value.dim() != 3 or target.dim() != 3 or value.shape[0] != 1 or value.shape[2] != target.shape[2]:
        return None
    src, dst = value.shape[1], target.shape[1]
    v = value.float().transpose(1, 2)                                          # (1, D, n)
    if key.endswith("pos_temporal"):
        out = F.interpolate(v, size=dst, mode="linear", align_corners=False)
    else:
        s, t = math.isqrt(src), math.isqrt(dst)
        if s * s != src or t * t != dst:
            return None
        out = F.interpolate(v.reshape(1, -1, s, s), size=(t, t), mode="bicubic", align_corners=False)
    return out.reshape(1, -1, dst).transpose(1, 2).to(target.dtype)


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, dict], strict: bool = False) -> LoadReport:
    """Load ``checkpoint`` (a path or a state dict, in any format above) into ``model``.

    Keys that match by name and shape are loaded; position embeddings are interpolated; a head
    of another class count is left as initialised and reported as mismatched. With
    ``strict=True`` any missing, unexpected or mismatched key raises ``ValueError`` listing all of
    them, before anything is loaded. Returns a :class:`LoadReport`.
    """
    source = _state_dict(checkpoint)
    target = model.state_dict()
    fixed_tables = {name for name, _ in model.named_buffers() if name not in target}   # e.g. the sin-cos table
    report, updates = LoadReport(), {}
    for raw, value in source.items():
        key = _normalise(raw)
        if raw.startswith(_DECODER) or key.startswith(_DECODER) or key in fixed_tables:
            report.ignored.append(raw)
            continue
        if key not in target and "classifier." + key in target:   # FAR's group-averaged classifier
            key = "classifier." + key
        if key not in target:
            report.unexpected.append(raw)
            continue
        want = target[key]
        if value.shape != want.shape:
            resized = _resize(key, value, want) if "pos" in key.rsplit(".", 1)[-1] else None
            if resized is None:
                report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
                continue
            report.interpolated.append(f"{key} {tuple(value.shape)}->{tuple(want.shape)}")
            value = resized
        updates[key] = value
    report.loaded = sorted(updates)
    report.missing = sorted(set(target) - set(updates) - {m[0] for m in report.mismatched})
    if strict and not report.clean:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: {report}")
    with torch.no_grad():
        for key, value in updates.items():
            target[key].copy_(value)
    return report


def from_hf_state_dict(state: dict) -> dict:
    """A Hugging Face VideoMAE state dict under vidkern's names: ``query``/``key``/``value`` fused
    into ``qkv`` (the key has no bias: vidkern's ``q_bias``/``v_bias``). Both layouts of the q/v
    biases are read: transformers 5.x's ``query.bias``/``value.bias`` and 4.x's separate
    ``attention.attention.q_bias``/``v_bias`` parameters."""
    out, layers = {}, {}
    for key, value in state.items():
        k = key.removeprefix("videomae.")
        if k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            layers.setdefault(int(i), {})[rest] = value
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed." + k.rsplit(".", 1)[1]] = value
        elif k.startswith("classifier."):
            out["head." + k.rsplit(".", 1)[1]] = value
        elif k.startswith(("fc_norm.", "layernorm.")):
            out[k.replace("layernorm.", "norm.")] = value
        else:
            out[key] = value                        # left for load_checkpoint to report
    names = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    for i, layer in layers.items():
        att = "attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([layer.pop(att + n + ".weight") for n in ("query", "key", "value")])
        for hf, vk in (("query", "q_bias"), ("value", "v_bias")):
            for name in (hf + ".bias", vk):          # transformers 5.x, 4.x
                if att + name in layer:
                    out[f"blocks.{i}.attn.{vk}"] = layer.pop(att + name)
        for hf_name, vk_name in names.items():
            for kind in ("weight", "bias"):
                if f"{hf_name}.{kind}" in layer:
                    out[f"blocks.{i}.{vk_name}.{kind}"] = layer.pop(f"{hf_name}.{kind}")
        out.update({f"hf.encoder.layer.{i}.{rest}": v for rest, v in layer.items()})   # anything unplaced
    return out
