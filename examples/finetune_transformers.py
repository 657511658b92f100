"""Fine-tune a Hugging Face VideoMAE through vidkern: convert it, add FAR's modules, train a step.

    pip install -e ".[hf]"
    python examples/finetune_transformers.py --model MCG-NJU/videomae-base-finetuned-kinetics --num-classes 174
    python examples/finetune_transformers.py --random-init --steps 1     # offline: a small random VideoMAE

vidkern takes clips (B, 3, T, H, W); Hugging Face's VideoMAE takes (B, T, 3, H, W).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vidkern import models


def load_hf(args):
    import transformers
    if args.random_init:
        cfg = transformers.VideoMAEConfig(image_size=64, num_frames=4, hidden_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=384, num_labels=args.num_classes)
        return transformers.VideoMAEForVideoClassification(cfg)
    return transformers.VideoMAEForVideoClassification.from_pretrained(args.model)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="MCG-NJU/videomae-base-finetuned-kinetics")
    parser.add_argument("--random-init", action="store_true", help="a small random VideoMAE (no download)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    hf = load_hf(args).eval()
    # FAR on the pretrained weights: HSDA attention, token-group interaction (zero-initialised, so
    # the network starts as the pretrained one) and the group-averaged classifier for the new labels.
    model = models.from_transformers(hf, attention="hsda", token_group_interaction=True, classifier="group_mean",
                                     num_classes=args.num_classes)
    print(model.load_report)
    cfg = model.cfg
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss = torch.tensor(float("nan"))
    for step in range(args.steps):
        clips = torch.randn(args.batch, 3, cfg.num_frames, cfg.img_size, cfg.img_size)
        labels = torch.randint(0, args.num_classes, (args.batch,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not torch.cuda.is_available()):
            loss = F.cross_entropy(model(clips).float(), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        print(f"step {step + 1}: loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
