"""Demo job: class-conditional MeanFlow on scikit-learn's bundled 8×8 digits, on a CPU in minutes.

It trains the same small DiT twice on the same data, steps and seeds, once with MeanFlow and once with
flow matching (MeanFlowLoss with ratio_r_neq_t = 0), then the iMF DiT of the same preset name with
IMFLoss (its official defaults) on the same data, steps, batch and seeds, draws 1- and 2-NFE samples
from all three (the same noise) and scores them with a classifier trained on real digits:

- class accuracy of the samples (does a "3" look like a 3 to the classifier?), and
- a Fréchet distance on the classifier's penultimate features against held-out real digits (a blurry
  class average can score well on accuracy alone; it cannot hide from the distance).

Writes to --out: samples_{meanflow,flowmatching,imf}_1nfe.png (rows = classes),
meanflow_digits.safetensors and imf_digits.safetensors (the MeanFlow and iMF models' EMA weights, model
files of ``meanflow_fast.save_model``: ``meanflow-sample --ckpt`` and ``meanflow_fast.load_model`` read
them) and metrics.json.

    meanflow-demo --out demo_out
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .imagenet.common import UsageError, positive_float, positive_int, run_cli
from .imf import IMFLoss, imf_dit
from .io import save_json
from .loss import MeanFlowLoss
from .metrics import feature_stats, frechet_distance
from .model import meanflow_dit
from .sampling import sample
from .training import EMA, train_step
from .weights import save_model

NUM_CLASSES = 10
# Presets small enough for a CPU; the model is built for the data (8×8, 1 channel, 10 classes).
DEMO_PRESETS = ("digits", "tiny")
DATA_SHAPE = dict(input_size=8, in_channels=1, num_classes=NUM_CLASSES)
SEED_RANGE = (-2 ** 63, 2 ** 64 - 8)  # torch generators take [-2**63, 2**64 - 1]; the demo uses seed + 7
# iMF's guidance at sampling, (ω, t_min, t_max) per step count. Chosen by the lowest Fréchet distance against
# the *training* digits over ω ∈ {1, 1.5, 2, 3, 4} × intervals {[0, 1], [0.3, 0.7], [0.4, 0.65]}, so the
# held-out reference chooses nothing (the sweep's table: docs/TUNING.md, "Demo: iMF guidance").
IMF_GUIDANCE = {1: (2.0, 0.4, 0.65), 2: (1.5, 0.4, 0.65)}


# =================================================================================================
#                                             Data
# =================================================================================================
def load_digits_split(seed: int = 0, test_frac: float = 0.3):
    """scikit-learn's 1,797 bundled 8×8 digits scaled to [−1, 1], split per class into train/held-out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("the demo needs scikit-learn: pip install -e '.[demo]'") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(NUM_CLASSES):
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: int(round(test_frac * len(idx)))]] = True
    return (x[~test], y[~test]), (x[test], y[test])


# =================================================================================================
#                                    Evaluation classifier
# =================================================================================================
class DigitClassifier(nn.Module):
    def __init__(self, feat_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, feat_dim), nn.GELU())
        self.head = nn.Linear(feat_dim, NUM_CLASSES)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y, steps: int = 1500, seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=g)
        xb = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)  # light noise: robust features
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def evaluate(clf: DigitClassifier, x, y, ref_stats) -> dict:
    x = x.clamp(-1, 1)
    acc = (clf(x).argmax(1) == y).float().mean().item()
    fd = frechet_distance(*feature_stats(clf.features(x).numpy()), *ref_stats)
    return {"class_accuracy": round(acc, 4), "frechet_distance": round(fd, 4)}


# =================================================================================================
#                                     Generative training
# =================================================================================================
def train_generator(name: str, loss_fn, x, y, args) -> EMA:
    """The EMA of a MeanFlow DiT trained with ``loss_fn`` (a MeanFlowLoss), or of an iMF DiT for
    ``name == "imf"`` (an IMFLoss); the seeds and the order of random draws are the same for every name."""
    torch.manual_seed(args.seed)
    model = imf_dit(args.preset, **DATA_SHAPE) if name == "imf" else meanflow_dit(args.preset, **DATA_SHAPE)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    ema = EMA(model, decay=args.ema)
    g = torch.Generator().manual_seed(args.seed + 1)
    bar = tqdm(range(args.steps), desc=f"train {name}", unit="step", dynamic_ncols=True,
               disable=args.quiet)
    for step in bar:
        idx = torch.randint(0, len(x), (args.batch_size,), generator=g)
        stats = train_step(model, loss_fn, opt, x[idx], y[idx], ema=ema, generator=g)
        if step % 25 == 0:
            loss = {"loss_u": stats["loss_u"]} if name == "imf" else {"raw_loss": stats["raw_loss"]}
            bar.set_postfix(**{k: f"{v:.3f}" for k, v in loss.items()}, r_neq_t=f"{stats['frac_r_neq_t']:.2f}")
    return ema


def save_grid(x: torch.Tensor, path: str, nrow: int, scale: int = 4) -> None:
    """(n, 1, 8, 8) in [−1, 1] → a PNG grid with ``nrow`` images per row (1-pixel gaps)."""
    from PIL import Image
    n, _, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    img = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, dtype=np.uint8)
    pix = ((1 - x.clamp(-1, 1)) * 127.5).round().to(torch.uint8).numpy()  # dark ink on white
    for i in range(n):
        r, c = divmod(i, nrow)
        img[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = pix[i, 0]
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


# =================================================================================================
#                                              Main
# =================================================================================================
def main(args) -> dict:
    t_start = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    (x_tr, y_tr), (x_te, y_te) = load_digits_split(args.seed)
    os.makedirs(args.out, exist_ok=True)
    print(f"digits: {len(x_tr)} train, {len(x_te)} held-out; preset {args.preset}, {args.steps} steps, "
          f"batch {args.batch_size}")

    clf = train_classifier(x_tr, y_tr, steps=args.classifier_steps, seed=args.seed)
    with torch.no_grad():
        ref_stats = feature_stats(clf.features(x_te).numpy())
    metrics = {"config": {k: v for k, v in vars(args).items()},
               "real_heldout": evaluate(clf, x_te, y_te, ref_stats)}
    # Floor: a real sample of the same size from the train split against the held-out digits.
    metrics["real_train"] = evaluate(clf, x_tr[: len(x_te)], y_tr[: len(x_te)], ref_stats)

    y_eval = torch.arange(NUM_CLASSES).repeat_interleave(args.samples_per_class)
    # iMF trains last: each run reseeds, so the MeanFlow and flow-matching results do not depend on it.
    runs = {"meanflow": MeanFlowLoss(ratio_r_neq_t=args.ratio_r_neq_t, class_dropout=0.1),
            "flowmatching": MeanFlowLoss(ratio_r_neq_t=0.0, class_dropout=0.1),
            "imf": IMFLoss()}
    for name, loss_fn in runs.items():
        t0 = time.time()
        ema = train_generator(name, loss_fn, x_tr, y_tr, args)
        train_s = time.time() - t0
        model = ema.model
        for steps in (1, 2):
            guidance = dict(zip(("omega", "t_min", "t_max"), IMF_GUIDANCE[steps])) if name == "imf" else {}
            xs = sample(model, y_eval, steps=steps, generator=torch.Generator().manual_seed(args.seed + 7),
                        **guidance)
            metrics[f"{name}_{steps}nfe"] = evaluate(clf, xs, y_eval, ref_stats)
            if steps == 1:
                grid_idx = torch.arange(NUM_CLASSES)[:, None] * args.samples_per_class + torch.arange(10)
                save_grid(xs[grid_idx.flatten()], os.path.join(args.out, f"samples_{name}_1nfe.png"), nrow=10)
        metrics[f"{name}_train_seconds"] = round(train_s, 1)
        if name in ("meanflow", "imf"):
            # Samples are images in the data's scale: [−1, 1] maps to 0…255 (meanflow-sample reads it).
            save_model(model, os.path.join(args.out, f"{name}_digits.safetensors"), space="pixels",
                       pixel_range=(-1.0, 1.0), weights="ema", preset=args.preset)
    metrics["imf_guidance"] = {f"{steps}nfe": dict(zip(("omega", "t_min", "t_max"), g)) for steps, g in
                               IMF_GUIDANCE.items()}
    metrics["total_seconds"] = round(time.time() - t_start, 1)
    save_json(metrics, os.path.join(args.out, "metrics.json"))

    print(f"\n{'samples':<22}{'class acc':>10}{'Fréchet dist':>14}")
    for key in ("real_heldout", "real_train", "meanflow_1nfe", "flowmatching_1nfe", "imf_1nfe", "meanflow_2nfe",
                "flowmatching_2nfe", "imf_2nfe"):
        m = metrics[key]
        print(f"{key:<22}{m['class_accuracy']:>10.3f}{m['frechet_distance']:>14.3f}")
    print(f"wrote {args.out}/ (PNG grids, meanflow_digits.safetensors, imf_digits.safetensors, metrics.json) "
          f"in {metrics['total_seconds']:.0f} s")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-demo",
                                description="MeanFlow vs flow matching vs iMF on bundled 8×8 digits (CPU, minutes).")
    p.add_argument("--out", default="demo_out", help="output directory (created if missing)")
    p.add_argument("--preset", default="digits", choices=DEMO_PRESETS,
                   help="model preset, built for 8×8 1-channel digits and 10 classes: %(choices)s")
    p.add_argument("--steps", type=positive_int, default=800, help="training steps per model")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the sampled weights, in [0, 1)")
    p.add_argument("--ratio-r-neq-t", type=float, default=0.25, help="MeanFlow's fraction with r ≠ t, in [0, 1]")
    p.add_argument("--samples-per-class", type=positive_int, default=100, help="≥ 10 (the PNG grids show 10)")
    p.add_argument("--classifier-steps", type=positive_int, default=1500,
                   help="training steps of the evaluation classifier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_out(path: str) -> None:
    """--out must be a directory that exists and is writable, or one that can be created."""
    if not path:
        raise UsageError("argument --out: must not be empty")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"argument --out: {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"argument --out: directory {path} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"argument --out: cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"argument --out: cannot create {path}: {parent} is not writable")


def check_args(args) -> None:
    if args.samples_per_class < 10:
        raise UsageError(f"argument --samples-per-class: must be an integer ≥ 10, got {args.samples_per_class}")
    if not 0.0 <= args.ema < 1.0:
        raise UsageError(f"argument --ema: must be in [0, 1), got {args.ema}")
    if not 0.0 <= args.ratio_r_neq_t <= 1.0:
        raise UsageError(f"argument --ratio-r-neq-t: must be in [0, 1], got {args.ratio_r_neq_t}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise UsageError(f"argument --seed: must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {args.seed}")
    check_out(args.out)


def cli(argv=None) -> None:
    """The ``meanflow-demo`` command: a bad argument is a usage error (exit 2) before any work."""
    run_cli(build_parser(), check_args, main, argv)


if __name__ == "__main__":
    cli()
