"""Pretrain the miniature's backbone, dinov2_vitt8_tin: a ViT-Tiny/8 with DINOv2's interface
(tools/tinyvit) trained with cross-entropy on Tiny-ImageNet-200 at 64 px. Writes a local torch.hub
folder that grpo_rm.py loads with --hub-repo OUT --model dinov2_vitt8_tin.

    python3 tools/prepare_data.py tinyimagenet --data-dir data/tinyimagenet
    python3 tools/pretrain_backbone.py --data-dir data/tinyimagenet --out hub-tin [--resume]

The recipe: classes by sorted wnid; inputs scaled to [0, 1] and normalised with ImageNet's mean
and std; reflect-pad 4 px, one random 64 × 64 crop per batch, a horizontal flip per image; the
backbone (seed 0) plus a linear head on the class token; cross-entropy with label smoothing 0.1;
AdamW, lr 1e-3, weight decay 0.05, batch 256 (the last partial batch dropped), OneCycleLR (pct_start
0.05) over 13 epochs; bf16 autocast. After each epoch: the head's top-1 on val. OUT holds
hubconf.py, dinov2_vitt8_tin.pth (the backbone's state dict, DINOv2's key names, no head),
log.json (per epoch: loss, top-1, seconds) and, while it runs, ckpt.pt (--resume goes on from it).
"""
import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

TOOLS = os.path.dirname(os.path.abspath(__file__))
HUB = os.path.join(TOOLS, "tinyvit")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_split(root, classes=None):
    """An image folder's split -> (uint8 images (N, 3, H, W), labels (N,), class names)."""
    classes = classes or sorted(os.listdir(root))
    images, labels = [], []
    for y, name in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, name))):
            with Image.open(os.path.join(root, name, f)) as im:
                images.append(np.asarray(im.convert("RGB")).transpose(2, 0, 1))
            labels.append(y)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), classes


def normalise(x):
    """uint8 (B, 3, H, W) -> float, ImageNet's mean and std."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean.to(x.device)) / std.to(x.device)


def augment(x, size, gen):
    """Reflect-pad 4 px, one random size × size crop for the batch, a flip per image."""
    x = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, x.shape[-1] - size + 1, (2,), generator=gen).tolist()
    x = x[..., i:i + size, j:j + size]
    flip = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def top1(backbone, head, x, y, batch_size, device, autocast):
    backbone.eval()
    head.eval()
    correct = 0
    with torch.no_grad(), autocast:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            z = head(backbone(normalise(xb.to(device))))
            correct += (z.argmax(1).cpu() == yb).sum().item()
    backbone.train()
    head.train()
    return 100 * correct / len(y)


def resume(ckpt, parts, gen):
    """The state of the last finished epoch -> (the log so far, the next epoch)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for k, v in parts.items():
        v.load_state_dict(state[k])
    gen.set_state(state["gen"])
    print(f"resumed from {ckpt}: epoch {state['epoch'] + 1}", flush=True)
    return state["log"], state["epoch"]


def pretrain(args):
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    x, y, classes = load_split(os.path.join(args.data_dir, "train"))
    xv, yv, _ = load_split(os.path.join(args.data_dir, "val"), classes)
    print(f"{len(y)} train / {len(yv)} val images, {len(classes)} classes", flush=True)
    torch.manual_seed(0)
    backbone = torch.hub.load(HUB, "dinov2_vitt8_tin", source="local", pretrained=False).to(device)
    head = nn.Linear(backbone.embed_dim, len(classes)).to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    steps = len(y) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps,
                                                pct_start=0.05)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.dtype == "bf16")
    gen, log, start = torch.Generator().manual_seed(0), [], 0
    parts = {"backbone": backbone, "head": head, "opt": opt, "sched": sched}
    ckpt = os.path.join(args.out, "ckpt.pt")
    if args.resume and os.path.isfile(ckpt):
        log, start = resume(ckpt, parts, gen)
    for epoch in range(start, args.epochs):
        t0, losses = time.time(), []
        order = torch.randperm(len(y), generator=gen)
        for s in range(steps):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            xb = normalise(augment(x[idx], args.img_size, gen).to(device))
            with autocast:
                loss = F.cross_entropy(head(backbone(xb)).float(), y[idx].to(device),
                                       label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if (s + 1) % args.log_every == 0:
                eta = (time.time() - t0) / (s + 1) * (steps - s - 1)
                print(f"epoch {epoch + 1}/{args.epochs} step {s + 1}/{steps} | loss "
                      f"{np.mean(losses[-args.log_every:]):.3f} | epoch ETA {eta:.0f} s",
                      flush=True)
        acc = top1(backbone, head, xv, yv, 4 * args.batch_size, device, autocast)
        log.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_top1": acc,
                    "seconds": time.time() - t0})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {log[-1]['loss']:.3f}, val top-1 "
              f"{acc:.2f}%, {log[-1]['seconds']:.0f} s", flush=True)
        state = {k: v.state_dict() for k, v in parts.items()}
        torch.save({**state, "log": log, "gen": gen.get_state(), "epoch": epoch + 1}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
    torch.save(backbone.state_dict(), os.path.join(args.out, "dinov2_vitt8_tin.pth"))
    shutil.copyfile(os.path.join(HUB, "hubconf.py"), os.path.join(args.out, "hubconf.py"))
    with open(os.path.join(args.out, "log.json"), "w") as f:
        json.dump({"config": vars(args), "classes": len(classes), "epochs": log}, f, indent=1)
    os.remove(ckpt)
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="Tiny-ImageNet as tools/prepare_data.py "
                   "leaves it: train/<wnid>/, val/<wnid>/")
    p.add_argument("--out", required=True, help="the torch.hub folder to write")
    p.add_argument("--epochs", type=int, default=13)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="autocast; fp32 where the CPU lacks bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=50, help="a progress line every N steps")
    p.add_argument("--resume", action="store_true", help="go on from OUT/ckpt.pt")
    args = p.parse_args(argv)
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(args.data_dir, sub)):
            sys.exit(f"error: --data-dir {args.data_dir}: no {sub}/; python3 tools/prepare_data.py "
                     f"tinyimagenet --data-dir {args.data_dir} makes it")
    return pretrain(args)


if __name__ == "__main__":
    main()
