"""meanflow-extract: ImageFolder → ADM center crop → SD-VAE latents, normalised (+ flipped copies) → shards.

    torchrun --nproc_per_node 8 -m meanflow_fast.imagenet.extract \\
        --data-path /data/imagenet/train --out /data/imagenet-latents --vae /models/sd-vae-ft-ema

The sorted file list is cut into shards of ``--shard-size`` images; rank r encodes shards r, r + W,
r + 2W, … and writes each one atomically, so a re-run skips finished shards (resumable). Images that
cannot be decoded are skipped with a warning and counted (per shard and in ``dataset.json``).

Latents (``--latent``): ``mean`` (default) stores the posterior's mean: deterministic, so a re-run writes
bit-identical shards. ``mean-std`` stores the posterior's mean and std, and the training loader draws a
fresh posterior sample per use from them (the official MeanFlow and iMF recipes; twice the disk).
``sample`` stores one fixed draw per image (seeded by ``--seed`` and the image's index), frozen for
every epoch. ``--latent-norm`` is the convention the stored values are in (imagenet/latents.py):
``sd-0.18215`` (raw × 0.18215, DiT and MeanFlow; default) or ``imf-channel`` (iMF's per-channel
(raw − mean)/std).
"""
import argparse
import math
import os
import time

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..io import remove_stale_tmp, save_json
from .common import (UsageError, barrier, cleanup_distributed, get_logger, init_distributed, nonneg_int,
                     positive_int, run_cli, run_command)
from .config import DEFAULT_VAE, LATENT_SCALE
from .data import (ImageFolderImages, collate_skip_bad, list_image_folder, read_shard_meta, shard_name,
                   write_shard)
from .latents import LATENT_NORMS, normalize, normalize_std
from .vae import load_vae

__all__ = ["main", "build_parser", "check_args", "cli"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _shard_done(path: str, args, expected: int) -> bool:
    """A finished shard from the same settings → True; none → False; a different one → UsageError."""
    if not os.path.exists(path):
        return False
    meta = read_shard_meta(path)
    for key, want in (("image_size", args.image_size), ("latent_mode", args.latent),
                      ("latent_norm", args.latent_norm), ("expected", expected)):
        if meta.get(key) != want:
            raise UsageError(f"{path} exists but was written with {key}={meta.get(key)!r}, not {want!r}; use a new "
                             f"--out folder (or delete it) to extract with other settings")
    return True


@torch.no_grad()
def _encode(vae, x: torch.Tensor, idx: torch.Tensor, mode: str, seed: int, norm: str):
    """(latents, latents of the flipped images, None or their (std, flipped std)) in ``norm``, float32."""
    both = torch.cat([x, x.flip(3)]).to(vae.device, vae.dtype)
    post = vae.encode(both).latent_dist
    z = post.mean.float()
    if mode == "sample":
        # One draw per image (and per flip), seeded by the image's global index: independent of the
        # batch size, the number of ranks and resumption.
        eps = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + 2 * int(i) + f))
                           for f in (0, 1) for i in idx]).to(z.device)
        z = z + post.std.float() * eps
    z = normalize(z, norm).cpu()
    if mode != "mean-std":
        return z[: len(x)], z[len(x):], None
    s = normalize_std(post.std.float(), norm).cpu()
    return z[: len(x)], z[len(x):], (s[: len(x)], s[len(x):])


def main(args):
    env = init_distributed(args.device)
    log = get_logger("extract", env.is_main)
    files, classes = list_image_folder(args.data_path)
    n_shards = math.ceil(len(files) / args.shard_size)
    mine = list(range(env.rank, n_shards, env.world_size))
    todo = []
    for k in mine:
        lo, hi = k * args.shard_size, min(len(files), (k + 1) * args.shard_size)
        if not _shard_done(os.path.join(args.out, shard_name(k)), args, hi - lo):
            todo.append((k, lo, hi))
    vae = load_vae(args.vae, env.device, _DTYPES[args.vae_dtype]) if todo else None
    # --out is made only now, after every check that can fail: a usage error leaves no trace.
    os.makedirs(args.out, exist_ok=True)
    if env.is_main:
        remove_stale_tmp(args.out)
    barrier()
    log.info(f"latents: {args.latent} of the VAE {args.vae} posterior, in the {args.latent_norm} convention")
    log.info(f"{len(files)} images in {len(classes)} classes → {n_shards} shards of ≤ {args.shard_size}; "
             f"{env.world_size} rank(s); rank 0: {len(todo)} of {len(mine)} shards to do")

    indices = [i for _, lo, hi in todo for i in range(lo, hi)]
    ds = Subset(ImageFolderImages(files, args.image_size), indices)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=collate_skip_bad, pin_memory=env.device.type == "cuda")
    bar = tqdm(total=len(indices), desc="extract", unit="img", dynamic_ncols=True, disable=not env.is_main)
    t0 = time.time()
    shard_iter = iter(todo)
    cur = next(shard_iter, None)
    acc = {"z": [], "zf": [], "s": [], "sf": [], "y": [], "bad": []}
    seen = 0  # items of the current shard accounted for (good + bad)

    def flush():
        nonlocal cur, acc, seen
        k, lo, hi = cur
        z = torch.cat(acc["z"]) if acc["z"] else torch.zeros(0, 4, 1, 1)
        zf = torch.cat(acc["zf"]) if acc["zf"] else torch.zeros_like(z)
        y = torch.cat(acc["y"]) if acc["y"] else torch.zeros(0, dtype=torch.int64)
        stds = None
        if args.latent == "mean-std":
            stds = tuple(torch.cat(acc[key]) if acc[key] else torch.zeros_like(z) for key in ("s", "sf"))
        write_shard(os.path.join(args.out, shard_name(k)), z, zf, y,
                    {"image_size": args.image_size, **_norm_meta(args), "latent_mode": args.latent,
                     "vae": args.vae, "num_classes": len(classes), "expected": hi - lo,
                     "skipped": len(acc["bad"]), "skipped_files": [p for p, _ in acc["bad"]][:100],
                     "first_index": lo}, stds=stds)
        cur, acc, seen = next(shard_iter, None), {"z": [], "zf": [], "s": [], "sf": [], "y": [], "bad": []}, 0

    for x, y, idx, bad in loader:
        for _, path, reason in bad:
            log.warning(f"warning: skipping unreadable image {path} ({reason})")
        if x is not None:
            z, zf, stds = _encode(vae, x, idx, args.latent, args.seed, args.latent_norm)
        # A batch may straddle shards: hand each shard its items (the loader keeps the index order).
        good_idx = idx.tolist()
        remaining = len(good_idx) + len(bad)
        while remaining:
            k, lo, hi = cur
            sel = [j for j, i in enumerate(good_idx) if lo <= i < hi]
            if sel:
                sel_t = torch.tensor(sel)
                acc["z"].append(z[sel_t]); acc["zf"].append(zf[sel_t]); acc["y"].append(y[sel_t])
                if stds is not None:
                    acc["s"].append(stds[0][sel_t]); acc["sf"].append(stds[1][sel_t])
            shard_bad = [(p, r) for i, p, r in bad if lo <= i < hi]
            acc["bad"].extend(shard_bad)
            n = len(sel) + len(shard_bad)
            seen += n
            remaining -= n
            bar.update(n)
            if seen == hi - lo:
                flush()
            elif remaining:  # pragma: no cover - items are in index order
                raise RuntimeError("internal error: batch items outside the current shard")
    bar.close()
    if cur is not None:  # pragma: no cover - every item is accounted for above
        raise RuntimeError("internal error: extraction ended before its last shard was complete")
    barrier()
    if env.is_main:
        metas = [read_shard_meta(os.path.join(args.out, shard_name(k))) for k in range(n_shards)]
        summary = {"num_images": sum(m["count"] for m in metas), "skipped": sum(m["skipped"] for m in metas),
                   "num_shards": n_shards, "num_classes": len(classes), "classes": classes,
                   "image_size": args.image_size, "latent_shape": list(metas[0]["latent_shape"]) if metas else None,
                   **_norm_meta(args), "latent_mode": args.latent, "vae": args.vae,
                   "flipped_copies": True}
        save_json(summary, os.path.join(args.out, "dataset.json"))
        log.info(f"done in {time.time() - t0:.0f} s: {summary['num_images']} images encoded (+ flipped copies), "
                 f"{summary['skipped']} unreadable image(s) skipped → {args.out}")
    barrier()
    cleanup_distributed()
    return None


def _norm_meta(args) -> dict:
    """The convention's keys in the shard and dataset.json metadata (latent_scale only for sd-0.18215)."""
    return {"latent_norm": args.latent_norm,
            **({"latent_scale": LATENT_SCALE} if args.latent_norm == "sd-0.18215" else {})}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="ImageFolder root: one sub-folder per class")
    p.add_argument("--out", required=True, help="output folder for shard-*.safetensors and dataset.json")
    p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: hub id or local directory")
    p.add_argument("--vae-dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--image-size", type=positive_int, default=256, help="center-crop side (multiple of 8)")
    p.add_argument("--latent", "--latents", dest="latent", choices=("mean", "mean-std", "sample"), default="mean",
                   help="store the posterior's mean (deterministic, default), its mean and std (the loader draws "
                        "a fresh sample per use) or one fixed sample")
    p.add_argument("--latent-norm", choices=LATENT_NORMS, default="sd-0.18215",
                   help="sd-0.18215: raw × 0.18215 (DiT, MeanFlow; default); imf-channel: iMF's per-channel "
                        "(raw − mean)/std")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per VAE batch (per rank)")
    p.add_argument("--num-workers", type=nonneg_int, default=4, help="JPEG-decoding workers per rank")
    p.add_argument("--seed", type=int, default=0, help="seed of the --latent sample draws")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    return p


def check_args(args) -> None:
    if args.image_size % 8:
        raise UsageError(f"--image-size must be a multiple of 8 (the SD-VAE downsamples by 8), got {args.image_size}")
    if not os.path.isdir(args.data_path):
        raise UsageError(f"--data-path {args.data_path} does not exist or is not a directory")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a directory")


def cli(argv=None):
    return run_cli(build_parser(), check_args, main, argv)


def console() -> None:
    """The ``meanflow-extract`` command (exit status 0 on success; see ``common.run_command``)."""
    run_command(cli)


if __name__ == "__main__":
    console()
