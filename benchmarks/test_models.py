"""Whole-model training steps (forward + backward) of the presets, per backend.

``reference`` runs every vidkern op on the reference backend (dense masked attention,
materialised merge matrices); ``torch`` on the torch backend. FLOPs: the SPEC §4 forward
count x 3 (backward = 2x forward, the usual whole-network training estimate).
"""
import functools

import pytest
import torch

from vidkern import flops, models
from cases import BATCH, DEVICE, DTYPE, MODEL_PRESETS, QUICK

SMALL = dict(embed_dim=32, num_heads=2, img_size=32, num_frames=4,
             team_ratios={"early": (0.25, 0.5, 0.75), "late": (0.125, 0.25, 0.5)})


@functools.lru_cache(maxsize=None)
def gmacs(name):
    return flops.count_preset(name, **(SMALL if QUICK else {})).gmacs


@pytest.mark.parametrize("name", MODEL_PRESETS)
@pytest.mark.parametrize("provider", ["reference", "torch"])
def test_model_step(measure, provider, name):
    model = models.create(name, backend=provider, drop_path_rate=0.0, **(SMALL if QUICK else {}))
    model = model.to(DEVICE, DTYPE).train()
    cfg = model.cfg
    clips = torch.randn(BATCH, 3, cfg.num_frames, cfg.img_size, cfg.img_size, device=DEVICE, dtype=DTYPE)
    params = [p for p in model.parameters()]
    fwd = 2e9 * gmacs(name) * BATCH
    measure(lambda c, *p: model(c), (clips, *params), case=f"model {name} B={BATCH} fwd+bwd", provider=provider,
            mode="fwd+bwd", flops={"fwd": fwd, "bwd": 2 * fwd}, nbytes={"fwd": 0, "bwd": 0}, dtype=DTYPE,
            budget_s=0.5)
