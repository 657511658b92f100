"""vidkern modules: drop-in pieces for ViT video models.

- :class:`HSDAttention` — FAR head-split sparse-dense attention (timm/VideoMAE parameter names).
- :class:`TokenGroupInteraction`, :class:`GroupAveragedClassifier` — the rest of FAR.
- :class:`TEAM` — summarize-and-gate. :class:`STTM` — token merging.
- :class:`Block` — a ViT block combining them.
"""
from .attention import ATTENTION_KINDS, HSDAttention, attention_kind
from .block import Block, DropPath, Mlp
from .far import GroupAveragedClassifier, TokenGroupInteraction
from .sttm import STTM, merged_count
from .team import TEAM, TEAM_RATIOS, team_width

__all__ = ["HSDAttention", "TokenGroupInteraction", "GroupAveragedClassifier", "TEAM", "STTM", "Block", "Mlp",
           "DropPath", "ATTENTION_KINDS", "attention_kind", "TEAM_RATIOS", "team_width", "merged_count"]
