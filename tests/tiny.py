"""A tiny video ViT built from every vidkern module, for module/compile/DDP tests."""
import torch
from torch import nn

from vidkern.nn import STTM, Block, GroupAveragedClassifier


class TinyVideoViT(nn.Module):
    """Clips ``(B, 3, T, H, W)`` -> logits. FAR blocks (TGI, HSDA, TEAM), then STTM merging and a
    global block; a group-averaged head on the pre-merge tokens plus a mean-pooled head after."""

    def __init__(self, dim=48, heads=4, grid=(2, 3, 5), num_classes=7, tubelet=(2, 4, 4), sttm=True, backend=None):
        super().__init__()
        self.grid = grid
        self.patch = nn.Conv3d(3, dim, tubelet, stride=tubelet)
        self.pos = nn.Parameter(torch.randn(1, grid[0] * grid[1] * grid[2], dim) * 0.02)
        self.far = nn.ModuleList([
            Block(dim, heads, grid, attention="hsda", token_group_interaction=True, backend=backend),
            Block(dim, heads, grid, attention="hsda", team_ratios=(0.25, 0.5, 0.75), backend=backend),
        ])
        self.group_head = GroupAveragedClassifier(dim, num_classes, grid)
        self.sttm = STTM(dim, merge_ratio=0.5, backend=backend) if sttm else None
        self.late = Block(dim, heads, attention="global", team_ratios=(0.25, 0.5, 0.75), backend=backend)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, clips):
        x = self.patch(clips).flatten(2).transpose(1, 2) + self.pos
        for blk in self.far:
            x = blk(x)
        logits = self.group_head(x)
        if self.sttm is not None:
            x, _ = self.sttm(x, self.pos)
        x = self.late(x)
        return logits + self.head(self.norm(x.mean(1)))


def clip_for(model, batch=2, seed=0):
    t, hp, wp = model.grid
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 2 * t, 4 * hp, 4 * wp, generator=g)
