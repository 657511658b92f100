"""Shapes of the benchmark cases: ViT-S/B at 16x224x224 on GPU (B=8, bf16); ViT-S, batch 1,
float32 on CPU, so the whole CPU run fits in 15 minutes on 2 cores; tiny under QUICK."""
import torch

from conftest import QUICK

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
VIT = {"S": dict(dim=384, heads=6), "B": dict(dim=768, heads=12)}

if QUICK:
    SIZES, BATCH, GRID = {"S": dict(dim=32, heads=2)}, 1, (2, 4, 4)
elif GPU:
    SIZES, BATCH, GRID = VIT, 8, (8, 14, 14)
else:
    SIZES, BATCH, GRID = {"S": VIT["S"]}, 1, (8, 14, 14)

N = GRID[0] * GRID[1] * GRID[2]
MODEL_PRESETS = (["videomae_s", "far_s", "team_s", "sttm_vit_s"]
                 + (["videomae_b", "far_b", "team_b", "sttm_vit_b"] if GPU and not QUICK else []))
