"""Where the world VLM keeps motion direction and spatial relation: linear probes on its frozen video features.

    python benchmarks/world_vlm_probe.py                     # the shipped VLM, ~2 min on 1 core
    python benchmarks/world_vlm_probe.py --vlm DIR           # another one (scripts/pretrain_world_vlm.py --out DIR)

Whether a VLM ranks a right caption over a direction- or relation-swapped one depends first on whether its video
features carry them at all (the previous, tubelet-4 world VLM: in its patch tokens only; the shipped one: direction in
every feature, relation in the patch tokens). This asks that: clips with exactly one moving
object (4-way direction) and clips with one relation between two objects (4-way relation) are rendered from the
train split (probe training) and the held-out split (probe test); a multinomial logistic regression (L-BFGS, a little
L2, standardized features) is fitted on each feature the VLM exposes: the joint-space embedding (what the quality
reward's cosine sees), the [CLS] token, the tokens averaged over space per temporal position, and all patch tokens
flattened (what the fusion layers, and so the VTM head and the semantic reward, cross-attend to). Held-out accuracy
against the majority-class rate. Wide probes on few clips overfit (train accuracy is printed too).
"""
from __future__ import annotations

import argparse

import torch

from pisces_fast.data import shapes as S
from pisces_fast.world import load_world_vlm

DIRECTIONS = ("left", "right", "up", "down")


def labelled(specs, task: str):
    """(index, label) of the clips the task applies to."""
    out = []
    for k, spec in enumerate(specs):
        if task == "direction":
            motions = [o.motion for o in spec.objects]
            if len(motions) == 1 and motions[0] in DIRECTIONS:
                out.append((k, DIRECTIONS.index(motions[0])))
        elif len(spec.relations) == 1 and len(spec.objects) == 2:
            # "A left of B" and "B right of A" are the same clip: state the relation from the object whose
            # (color, shape) sorts first, so that the label is a property of the pixels, not of the caption's order.
            rel = spec.relations[0]
            subject, reference = spec.objects[rel.subject], spec.objects[rel.reference]
            relation = rel.relation
            if (str(subject.color), subject.shape) > (str(reference.color), reference.shape):
                relation = S.CONVERSE_RELATION[relation]
            out.append((k, S.RELATIONS.index(relation)))
    return out


@torch.no_grad()
def features(vlm, split: str, n: int, seed: int, task: str):
    clips = S.make_clips(n, split=split, seed=seed)
    pairs = labelled(clips.specs, task)
    videos = clips.videos[torch.tensor([k for k, _ in pairs])]
    f = vlm.encode_video(videos)
    patches = f.tokens[:, f.prefix_tokens:]
    b, t = len(pairs), f.grid[0]
    feats = {
        "joint embedding": f.embed,
        "[CLS] token": f.tokens[:, 0],
        "tokens, mean over space per time": patches.reshape(b, t, -1, patches.shape[-1]).mean(2).reshape(b, -1),
        "all patch tokens": patches.reshape(b, -1),
    }
    return {k: v.float() for k, v in feats.items()}, torch.tensor([y for _, y in pairs])


def probe(xtr, ytr, xte, yte, classes: int, weight_decay: float = 1e-3):
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(xtr.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr), ytr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(1) == yte).float().mean()), float((lin(xtr).argmax(1) == ytr).float().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vlm", default=None, help="a saved world VLM directory (default: the shipped one)")
    parser.add_argument("--train_clips", type=int, default=3000, help="train-split clips rendered (a share qualifies)")
    parser.add_argument("--test_clips", type=int, default=1500, help="held-out clips rendered")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vlm = load_world_vlm(args.vlm) if args.vlm else load_world_vlm()
    print("| task | feature | dim | held-out acc. | majority rate | train acc. | clips (train / held-out) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for task in ("direction", "relation"):
        xtr, ytr = features(vlm, "train", args.train_clips, 1, task)
        xte, yte = features(vlm, "heldout", args.test_clips, 2, task)
        majority = float(torch.bincount(yte, minlength=4).max()) / len(yte)
        for name in xtr:
            te, tr = probe(xtr[name], ytr, xte[name], yte, 4)
            rows.append((task, name, te))
            print(f"| {task} | {name} | {xtr[name].shape[1]} | {te:.3f} | {majority:.3f} | {tr:.3f} | "
                  f"{len(ytr)} / {len(yte)} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
