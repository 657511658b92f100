"""The examples run (short versions), and the synthetic task is what it says it is."""
import importlib.util
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moving_squares_move_in_the_labelled_direction():
    train = example("train_synthetic")
    clips, labels = train.moving_squares(16, generator=torch.Generator().manual_seed(0))
    bright = clips.mean(1) > 0.8                                       # (B, T, H, W): the square
    ys, xs = torch.arange(32.0)[:, None], torch.arange(32.0)[None, :]
    w = bright.float()
    cy = (w * ys).sum((-1, -2)) / w.sum((-1, -2))
    cx = (w * xs).sum((-1, -2)) / w.sum((-1, -2))
    motion = torch.stack([cy[:, -1] - cy[:, 0], cx[:, -1] - cx[:, 0]], -1)   # (dy, dx) over the clip
    assert torch.equal(torch.sign(motion).long(), train.DIRECTIONS[labels])


def test_train_synthetic_smoke():
    acc = example("train_synthetic").main(["--steps", "3", "--batch", "4"])
    assert 0.0 <= acc <= 1.0


def test_finetune_transformers_smoke():
    pytest.importorskip("transformers", reason="transformers is the optional extra 'hf'")
    loss = example("finetune_transformers").main(["--random-init", "--steps", "1"])
    assert math.isfinite(loss)
