"""Paper architectures, ready to build: ``vidkern.models.create(name, **overrides)``.

Presets (SPEC §1-§3; clips ``(B, 3, T, H, W)`` -> logits ``(B, num_classes)``):

- ``videomae_s`` / ``videomae_b``: the VideoMAE fine-tuning ViT — 2x16x16 tubelets, 16 frames,
  fixed 1-D sin-cos position embedding over the flattened tokens, no CLS token, q/v biases,
  mean pooling + ``fc_norm``.
- ``far_s`` / ``far_b``: HSDA in every block, token-group interaction before every attention,
  group-averaged classifier (FAR).
- ``team_s`` / ``team_b``: TEAM after the MLP of blocks 5-12 with the SPEC §2 ratios.
- ``sttm_vit_s`` / ``sttm_vit_b``: ImageNet-style video ViT — 1x16x16 patches, 8 frames, CLS
  token, learnable spatial and temporal position embeddings — with STTM before blocks 6
  (spatial, per frame) and 9 (spatio-temporal); the preceding block's CLS attention, averaged
  over heads, feeds STTM's filter (SPEC §3.3).

Overrides: any :class:`ViTConfig` field, notably ``attention`` (``"global"``,
``"sparse_dense"``, ``"temporal"``, ``"hsda"``, ``"head_split_temporal"``),
``token_group_interaction``, ``tgi_groups``, ``classifier`` (``"mean"``, ``"group_mean"``,
``"cls"``), ``team``, ``sttm``, ``num_classes``, ``num_frames``, ``img_size``,
``drop_path_rate``. After an STTM merge the tokens no longer form a grid, so the blocks after
it attend globally and token-group interaction stops there *(choice)*.

Clips must have exactly the configured size, ``(B, 3, num_frames, img_size, img_size)``: the
position embedding has one entry per token of the configured grid (see
:meth:`VideoViT.check_clips`). Every config is checked when it is made (:func:`check_config`):
entries that could never take effect, such as ``sttm_blocks`` or ``team_blocks`` beyond
``depth``, are errors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .checkpoints import LoadReport, load_checkpoint  # noqa: F401  (vidkern.models.load_checkpoint)
from . import checks, patterns
from .sdpa import TOKEN_ORDERS
from .nn import STTM, TEAM_RATIOS, Block, GroupAveragedClassifier
from .nn import _checks
from .nn.attention import ATTENTION_KINDS

CLASSIFIERS = ("mean", "group_mean", "cls")
GROUPED_ATTENTION = ("hsda", "sparse_dense")     # the attention kinds whose pattern is the checkerboard
POS_EMBEDS = ("sincos", "learned_st")
QKV_BIASES = ("qv", "qkv", "none")


@dataclass
class ViTConfig:
    """Everything that defines a vidkern video ViT. ``create`` fills it from a preset and overrides."""

    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 174
    num_frames: int = 16
    img_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 2
    cls_token: bool = False
    pos_embed: str = "sincos"          # "sincos": VideoMAE's fixed table; "learned_st": spatial + temporal
    qkv_bias: str = "qv"               # "qv": VideoMAE q/v biases; "qkv": timm's full bias; "none"
    norm_eps: float = 1e-6             # every LayerNorm's eps (Hugging Face's VideoMAE uses 1e-12)
    attention: str = "global"
    token_group_interaction: bool = False
    tgi_groups: Optional[int] = None   # default: num_heads
    classifier: str = "mean"
    classifier_combine: str = "concat"  # group_mean: "concat" (SPEC default) or "mean"
    team: bool = False
    team_blocks: tuple = (4, 5, 6, 7, 8, 9, 10, 11)     # 0-based: blocks 5-12
    team_ratios: Optional[dict] = None  # {"early": (r1, r2, r3), "late": ...}; default SPEC §2 by width
    sttm: bool = False
    sttm_blocks: tuple = (5, 8)        # 0-based: merges run before blocks 6 and 9
    sttm_ratios: tuple = (0.5, 0.5)    # spatial, spatio-temporal merge ratios rho
    drop_path_rate: float = 0.1
    head_drop_rate: float = 0.0
    head_init_scale: float = 0.001      # VideoMAE fine-tuning scales the head's initial weights
    backend: Optional[str] = None
    token_order: str = "natural"       # "grouped": tokens in checkerboard group-major order (vidkern.sdpa)
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple:
        return (self.num_frames // self.tubelet_size, self.img_size // self.patch_size,
                self.img_size // self.patch_size)


_S = dict(embed_dim=384, depth=12, num_heads=6)
_B = dict(embed_dim=768, depth=12, num_heads=12)
_FAR = dict(attention="hsda", token_group_interaction=True, classifier="group_mean", token_order="grouped")
_STTM_VIT = dict(patch_size=16, tubelet_size=1, num_frames=8, cls_token=True, pos_embed="learned_st",
                 qkv_bias="qkv", classifier="cls", sttm=True, head_init_scale=1.0)

PRESETS = {
    "videomae_s": dict(_S),
    "videomae_b": dict(_B),
    "far_s": dict(_S, **_FAR),
    "far_b": dict(_B, **_FAR),
    "team_s": dict(_S, team=True),
    "team_b": dict(_B, team=True),
    "sttm_vit_s": dict(_S, **_STTM_VIT),
    "sttm_vit_b": dict(_B, **_STTM_VIT),
}


def list_presets() -> list:
    """The preset names :func:`create` takes, sorted."""
    return sorted(PRESETS)


def config(name: str, **overrides) -> ViTConfig:
    """The :class:`ViTConfig` of preset ``name`` with ``overrides`` applied (checked, :func:`check_config`)."""
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)} - {"extra"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown override(s) {unknown}; valid: {sorted(fields)}")
    return check_config(ViTConfig(**{**PRESETS[name], **overrides}))


def _block_indices(name: str, value, depth: int, count: Optional[int] = None) -> None:
    """``value``: strictly increasing block indices in ``[0, depth)`` (``count`` of them if given)."""
    if (not isinstance(value, (tuple, list))
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise TypeError(f"{name} must be a tuple of block indices (ints), got {value!r}")
    if count is not None and len(value) != count:
        raise ValueError(f"{name} must hold {count} block indices, got {tuple(value)}")
    if not value:
        raise ValueError(f"{name} must hold at least one block index, got {tuple(value)}")
    if list(value) != sorted(set(value)):
        raise ValueError(f"{name} must be strictly increasing, got {tuple(value)}")
    outside = [i for i in value if not 0 <= i < depth]
    if outside:
        raise ValueError(f"{name}={tuple(value)} names blocks {outside} outside [0, depth) = [0, {depth}): "
                         "they would never run")


def _pair_of_ratios(name: str, value) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (spatial, spatio-temporal) of merge ratios, got {value!r}")
    for i, r in enumerate(value):
        if not 0 <= checks.finite(f"{name}[{i}]", r) < 1:
            raise ValueError(f"{name}[{i}] must be a merge ratio in [0, 1), got {r}")


def check_config(cfg: ViTConfig) -> ViTConfig:
    """Every rule a :class:`ViTConfig` must satisfy to build a model whose every entry takes effect:
    a ``TypeError``/``ValueError`` naming the field, the expected and the actual value. Entries
    that can never run are errors (``sttm_blocks``/``team_blocks`` beyond ``depth``, a grid
    attention or TGI with no block before the first merge). Returns ``cfg``."""
    for name in ("embed_dim", "depth", "num_heads", "num_classes", "num_frames", "img_size", "patch_size",
                 "tubelet_size"):
        _checks.positive_int(name, getattr(cfg, name))
    _checks.positive_float("mlp_ratio", cfg.mlp_ratio)
    _checks.positive_float("norm_eps", cfg.norm_eps)
    _checks.probability("drop_path_rate", cfg.drop_path_rate)
    _checks.probability("head_drop_rate", cfg.head_drop_rate)
    checks.finite("head_init_scale", cfg.head_init_scale)
    _checks.backend(cfg.backend)
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim={cfg.embed_dim} must be divisible by num_heads={cfg.num_heads}")
    if cfg.num_frames % cfg.tubelet_size or cfg.img_size % cfg.patch_size:
        raise ValueError(f"num_frames={cfg.num_frames} and img_size={cfg.img_size} must be multiples of "
                         f"tubelet_size={cfg.tubelet_size} and patch_size={cfg.patch_size}")
    for name, allowed in (("attention", tuple(sorted(ATTENTION_KINDS))), ("classifier", CLASSIFIERS),
                          ("classifier_combine", ("concat", "mean")), ("pos_embed", POS_EMBEDS),
                          ("qkv_bias", QKV_BIASES)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if cfg.tgi_groups is not None:
        _checks.positive_int("tgi_groups", cfg.tgi_groups)
    if cfg.classifier == "cls" and not cfg.cls_token:
        raise ValueError("classifier='cls' needs cls_token=True")
    if cfg.classifier == "group_mean" and cfg.cls_token:
        raise ValueError("classifier='group_mean' pools the grid tokens by group; a CLS token belongs to no "
                         "group: use classifier='cls' or 'mean' with cls_token=True")
    if cfg.classifier == "group_mean" and cfg.sttm:
        raise ValueError("classifier='group_mean' pools checkerboard groups of the token grid, "
                         "which STTM merging removes; use classifier='mean' or 'cls' with sttm=True")
    if cfg.cls_token and (cfg.attention != "global" or cfg.token_group_interaction):
        raise ValueError("a CLS token belongs to no grid group: use attention='global' and no "
                         f"token_group_interaction with cls_token=True (got attention={cfg.attention!r})")
    if cfg.team:
        _block_indices("team_blocks", cfg.team_blocks, cfg.depth)
        ratios = cfg.team_ratios if cfg.team_ratios is not None else TEAM_RATIOS.get(cfg.embed_dim)
        if ratios is None:
            raise ValueError(f"team_ratios are needed for embed_dim={cfg.embed_dim} (SPEC §2 gives them for "
                             f"{sorted(TEAM_RATIOS)})")
        if not isinstance(ratios, dict) or set(ratios) != {"early", "late"}:
            raise ValueError("team_ratios must be a dict {'early': (r1, r2, r3), 'late': (r1, r2, r3)}, "
                             f"got {ratios!r}")
    if cfg.sttm:
        _block_indices("sttm_blocks", cfg.sttm_blocks, cfg.depth, count=2)
        _pair_of_ratios("sttm_ratios", cfg.sttm_ratios)
        if cfg.sttm_blocks[0] == 0 and (cfg.attention != "global" or cfg.token_group_interaction):
            raise ValueError(f"attention={cfg.attention!r} and token_group_interaction act on the token grid, "
                             "i.e. in the blocks before the first STTM merge; sttm_blocks[0]=0 leaves none "
                             "(they would never run)")
    checks.choice("token_order", cfg.token_order, TOKEN_ORDERS)
    if cfg.token_order == "grouped" and (cfg.attention not in GROUPED_ATTENTION or cfg.cls_token or cfg.sttm):
        raise ValueError(f"token_order='grouped' orders the tokens by checkerboard group for attention in "
                         f"{GROUPED_ATTENTION} (the pattern FAR's classifier pools), with no CLS token and no "
                         f"STTM merging (which needs frame order); got attention={cfg.attention!r}, "
                         f"cls_token={cfg.cls_token}, sttm={cfg.sttm}")
    return cfg


def create(name: str, **overrides) -> "VideoViT":
    """Build preset ``name`` (see the module docstring) with ``overrides``."""
    return VideoViT(config(name, **overrides))


def from_transformers(hf_model, **overrides) -> "VideoViT":
    """The vidkern ViT of a Hugging Face ``VideoMAEForVideoClassification`` (or ``VideoMAEModel``),
    with every weight loaded, then ``overrides`` applied (``attention="hsda"``,
    ``token_group_interaction=True``, ``classifier="group_mean"``, ``team=True``, ``sttm=True``, ...).

    Sizes, heads, patch/tubelet, frames, labels, LayerNorm eps and pooling come from the HF config;
    an override of what the weights fix (``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``,
    ``patch_size``, ``tubelet_size``, ``qkv_bias``, ``norm_eps``, ``pos_embed``)
    that differs from the pretrained value raises ``ValueError`` naming both.
    HF keeps query/key/value separate (the key without bias); vidkern fuses them into ``qkv``. New
    modules are freshly initialised, token-group interaction with its last projection zeroed, so
    the converted network starts as the pretrained one. Without overrides its logits equal the HF
    model's (it takes clips ``(B, 3, T, H, W)``; HF takes ``(B, T, 3, H, W)``).

    It also trains as the HF model does: no stochastic depth (``drop_path_rate=0``, as VideoMAE
    has none; an override may add it), the HF model's parameter dtype and device (a bf16 model stays
    bf16), and dropout: vidkern's blocks have none, so an HF config with ``hidden_dropout_prob`` or
    ``attention_probs_dropout_prob`` above 0 is refused by name, unless ``hf_dropout="drop"`` says
    to train without it.
    """
    from .checkpoints import from_hf_state_dict
    c = hf_model.config
    hf_dropout = overrides.pop("hf_dropout", "refuse")
    if hf_dropout not in ("refuse", "drop"):
        raise ValueError(f"hf_dropout must be 'refuse' or 'drop', got {hf_dropout!r}")
    if getattr(c, "model_type", None) != "videomae":
        raise TypeError(f"hf_model must be a Hugging Face VideoMAE model, got model_type={getattr(c, 'model_type', None)!r}")
    if not getattr(c, "use_mean_pooling", True):
        raise NotImplementedError("use_mean_pooling=False (HF pools the first patch token) has no vidkern classifier")
    if c.hidden_act != "gelu" or c.num_channels != 3:
        raise NotImplementedError(f"hidden_act={c.hidden_act!r}, num_channels={c.num_channels}: vidkern's ViT "
                                  "uses exact GELU and RGB clips")
    dropouts = {name: getattr(c, name, 0.0) for name in ("hidden_dropout_prob", "attention_probs_dropout_prob")}
    if hf_dropout == "refuse" and any(dropouts.values()):
        raise ValueError(f"the HF config has dropout {dropouts}, which vidkern's blocks do not have (the fused "
                         "attention has no attention dropout): the converted model would train differently. Pass "
                         "hf_dropout='drop' to train without it, or set those config fields to 0")
    qv_bias = getattr(c, "qv_bias", getattr(c, "qkv_bias", True))
    # What the pretrained weights fix: an override that differs would leave a mostly random model.
    pretrained = dict(embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                      mlp_ratio=c.intermediate_size / c.hidden_size, patch_size=c.patch_size,
                      tubelet_size=c.tubelet_size, qkv_bias="qv" if qv_bias else "none", norm_eps=c.layer_norm_eps,
                      pos_embed="sincos")
    for key, value in overrides.items():
        if key in pretrained and value != pretrained[key]:
            raise ValueError(f"override {key}={value!r} does not match the pretrained model's {key}="
                             f"{pretrained[key]!r} (from its config): the weights would not fit. Overrides may "
                             "change num_classes, num_frames and img_size, and add modules (attention, "
                             "token_group_interaction, classifier, team, sttm, ...)")
    fields = dict(pretrained, num_classes=getattr(c, "num_labels", 0) or 1, num_frames=c.num_frames,
                  img_size=c.image_size, drop_path_rate=0.0)   # VideoMAE has no stochastic depth
    model = VideoViT(config("videomae_s", **{**fields, **overrides}))
    hf_state = hf_model.state_dict()
    report = load_checkpoint(model, from_hf_state_dict(hf_state))
    if report.unexpected:
        raise ValueError(f"weights of the HF model that vidkern cannot place: {report}")
    with torch.no_grad():
        for blk in model.blocks:
            if getattr(blk, "tgi", None) is not None:
                nn.init.zeros_(blk.tgi.fc2.weight)
                nn.init.zeros_(blk.tgi.fc2.bias)
    # HF builds the pooling norm with LayerNorm's default eps (1e-5), not config.layer_norm_eps.
    pool_norm = model.classifier.fc_norm if model.cfg.classifier == "group_mean" else model.fc_norm
    if isinstance(pool_norm, nn.LayerNorm):
        pool_norm.eps = 1e-5
    first = next((t for t in hf_state.values() if t.is_floating_point()), None)
    if first is not None:                      # train in the HF model's dtype, on its device
        model.to(device=first.device, dtype=first.dtype)
    model.load_report = report
    return model


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed 1-D sinusoid table ``(1, num_positions, dim)``: ``sin`` on even channels,
    ``cos`` on odd, angle ``pos / 10000 ** (2 * (j // 2) / dim)``."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor").double() / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class VideoViT(nn.Module):
    """A video ViT assembled from vidkern modules, configured by :class:`ViTConfig`.

    ``forward(clips (B, 3, T, H, W)) -> (B, num_classes)``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = check_config(cfg)
        self.grad_checkpointing = False
        d, grid = cfg.embed_dim, cfg.grid
        n = grid[0] * grid[1] * grid[2]
        self.patch_embed = nn.Conv3d(3, d, (cfg.tubelet_size, cfg.patch_size, cfg.patch_size),
                                     stride=(cfg.tubelet_size, cfg.patch_size, cfg.patch_size))
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_table(n, d), persistent=False)
        else:                               # "learned_st"
            self.pos_spatial = nn.Parameter(torch.zeros(1, grid[1] * grid[2], d))
            self.pos_temporal = nn.Parameter(torch.zeros(1, grid[0], d))
            nn.init.trunc_normal_(self.pos_spatial, std=0.02)
            nn.init.trunc_normal_(self.pos_temporal, std=0.02)
        if cfg.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.cls_pos, std=0.02)

        first_merge = cfg.sttm_blocks[0] if cfg.sttm else cfg.depth
        ratios = cfg.team_ratios if cfg.team_ratios is not None else TEAM_RATIOS.get(d)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear schedule
        blocks = []
        for i in range(cfg.depth):
            gridded = i < first_merge and not cfg.cls_token   # a CLS token or a merge leaves no grid
            team_ratios = None
            if cfg.team and i in cfg.team_blocks:
                team_ratios = ratios["early" if i < cfg.team_blocks[len(cfg.team_blocks) // 2] else "late"]
            blocks.append(Block(
                d, cfg.num_heads, grid if gridded else None, cfg.mlp_ratio,
                attention=cfg.attention if gridded else "global",
                qkv_bias=cfg.qkv_bias == "qkv", qv_bias=cfg.qkv_bias == "qv",
                token_group_interaction=cfg.token_group_interaction and gridded, tgi_groups=cfg.tgi_groups,
                team_ratios=team_ratios, drop_path=dpr[i], norm_eps=cfg.norm_eps, backend=cfg.backend,
                token_order=cfg.token_order))
        self.blocks = nn.ModuleList(blocks)
        if cfg.sttm:
            self.sttm_spatial = STTM(d, merge_ratio=cfg.sttm_ratios[0], backend=cfg.backend)
            self.sttm_temporal = STTM(d, merge_ratio=cfg.sttm_ratios[1], backend=cfg.backend)

        if cfg.classifier == "group_mean":
            self.classifier = GroupAveragedClassifier(d, cfg.num_classes, grid, combine=cfg.classifier_combine,
                                                      head_dropout=cfg.head_drop_rate, token_order=cfg.token_order)
        else:
            self.norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.classifier == "cls" else nn.Identity()
            self.fc_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.classifier == "mean" else nn.Identity()
            self.head_drop = nn.Dropout(cfg.head_drop_rate)
            self.head = nn.Linear(d, cfg.num_classes)
        self.apply(_init_weights)
        with torch.no_grad():
            head = self.classifier.head if cfg.classifier == "group_mean" else self.head
            head.weight.mul_(cfg.head_init_scale)
            head.bias.mul_(cfg.head_init_scale)

    def check_clips(self, clips) -> torch.Tensor:
        """``clips`` must be ``(B, 3, num_frames, img_size, img_size)`` exactly: the position
        embedding (a fixed sin-cos table or learned tables) has one entry per token of the
        configured grid, so a clip of another size (even one whose size rounds to the grid,
        which the tubelet convolution would silently crop) is refused. For another size build the
        model with that ``num_frames``/``img_size``; ``load_checkpoint`` interpolates learned
        position embeddings to it."""
        cfg = self.cfg
        clips = checks.tensor("clips", clips, 5, "(B, 3, T, H, W)")
        _, c, t, h, w = clips.shape
        if c != 3:
            raise ValueError(f"clips must have shape (B, 3, T, H, W) with 3 channels, got {tuple(clips.shape)}")
        if t != cfg.num_frames:
            raise ValueError(f"clips must have T = num_frames = {cfg.num_frames} frames (the model's configured "
                             f"size), got T={t} in shape {tuple(clips.shape)}; build the model with "
                             f"num_frames={t} for such clips")
        if (h, w) != (cfg.img_size, cfg.img_size):
            raise ValueError(f"clips must have H = W = img_size = {cfg.img_size} (the model's configured size), "
                             f"got H={h}, W={w} in shape {tuple(clips.shape)}; build the model with that img_size "
                             "for such clips")
        return clips

    def _tokens(self, clips):
        x = self.patch_embed(clips).flatten(2).transpose(1, 2)        # (B, N, D), natural grid order
        pos = self._positions()
        if self.cfg.token_order == "grouped":   # once, here: every block then runs on grouped tokens
            perm = patterns.grouped_order("checkerboard", self.cfg.grid, x.device)[0]
            x, pos = x[:, perm], pos[:, perm]
        return x + pos, pos

    def _positions(self) -> torch.Tensor:
        """Position feature of every grid token, ``(1, N, D)`` (STTM's first ``E``)."""
        if self.cfg.pos_embed == "sincos":
            return self.pos_embed
        return (self.pos_spatial[:, None] + self.pos_temporal[:, :, None]).flatten(1, 2)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block (and each STTM stage) in the backward instead of keeping its
        activations (``torch.utils.checkpoint``, non-reentrant). The RNG state is restored on
        recompute, so STTM's random start and DropPath draw the same values: gradients are identical."""
        self.grad_checkpointing = enable

    def _run(self, module, *args, **kwargs):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs)
        return module(*args, **kwargs)

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """``clips (B, 3, T, H, W)`` (see :meth:`check_clips`) -> final tokens ``(B, N', D)``."""
        cfg = self.cfg
        b = self.check_clips(clips).shape[0]
        t = cfg.grid[0]
        x, e = self._tokens(clips)
        cls = None
        if cfg.cls_token:
            cls = (self.cls_token + self.cls_pos).expand(b, -1, -1)
            x = torch.cat([cls, x], dim=1)
        scores = None
        for i, blk in enumerate(self.blocks):
            if cfg.sttm and i in cfg.sttm_blocks:
                if cls is not None:
                    cls, x = x[:, :1], x[:, 1:]                        # the CLS token bypasses merging
                if i == cfg.sttm_blocks[0]:                           # spatial: each frame on its own
                    per_frame, d = x.shape[1] // t, x.shape[2]
                    xf = x.reshape(b * t, per_frame, d)
                    ef = e.expand(b, -1, -1).reshape(b * t, per_frame, d)
                    sf = None if scores is None else scores.reshape(b * t, per_frame)
                    x, e = self._run(self.sttm_spatial, xf, ef, sf)
                    x, e = x.reshape(b, t * x.shape[1], d), e.reshape(b, t * e.shape[1], d)
                else:                                                  # spatio-temporal: all tokens
                    x, e = self._run(self.sttm_temporal, x, e.expand(b, -1, -1), scores)
                if cls is not None:
                    x = torch.cat([cls, x], dim=1)
            want_scores = cfg.sttm and cls is not None and i + 1 in cfg.sttm_blocks
            x = self._run(blk, x, return_cls_attention=want_scores)
            if want_scores:
                x, scores = x
        return x

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(clips)
        if self.cfg.classifier == "group_mean":
            return self.classifier(x)
        if self.cfg.classifier == "cls":
            pooled = self.norm(x)[:, 0]
        else:  # mean of the patch tokens (a CLS token, if any, is left out, as in timm)
            pooled = self.fc_norm((x[:, 1:] if self.cfg.cls_token else x).mean(1))
        return self.head(self.head_drop(pooled))

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"grid={c.grid}, attention={c.attention}, tgi={c.token_group_interaction}, team={c.team}, "
                f"sttm={c.sttm}, classifier={c.classifier}")


def _init_weights(m: nn.Module) -> None:
    """timm/VideoMAE initialisation: truncated normal (std 0.02) Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ViTConfig", "PRESETS", "CLASSIFIERS", "list_presets", "config", "create", "VideoViT", "sincos_table", "num_params"]
