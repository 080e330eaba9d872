"""meanflow-fid: FID of an ADM-layout sample .npz against reference statistics or reference images.

    meanflow-fid samples/xl2_1nfe.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights /models/pt_inception-2015-12-05-6726825d.pth

``--ref`` is an .npz with ``mu`` (2048,) and ``sigma`` (2048, 2048) (reference statistics), or one with
``arr_0`` uint8 (N, H, W, 3) images, whose statistics are computed here (``--save-ref-stats`` keeps them).
Features: the FID Inception-v3's pool3 (``inception.py``, pytorch-fid's input handling: bilinear resize to
299, [−1, 1]); the distance: ``meanflow_fast.metrics.frechet_distance``. Note that the ADM suite's own
numbers come from the TensorFlow graph; the same weights in torch agree closely but not bit-for-bit.
"""
import argparse
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import save_json, save_npz
from ..metrics import feature_stats, frechet_distance
from .common import UsageError, get_logger, positive_int, run_cli, run_command
from .inception import FIDInceptionV3, load_fid_inception

__all__ = ["main", "build_parser", "check_args", "cli", "load_images_npz", "inception_features",
           "reference_stats", "small_set_warning"]


def _open_npz(path: str, flag: str):
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} not found (expected an .npz file)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise UsageError(f"{flag} {path} is not a readable .npz file ({type(e).__name__}: {e})")


def _check_images(arr: np.ndarray, path: str, flag: str) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise UsageError(f"{flag} {path}: arr_0 must be uint8 (N, H, W, 3) images, got {arr.dtype} {arr.shape}")
    if arr.shape[0] < 2:
        raise UsageError(f"{flag} {path}: need at least 2 images for a covariance, got {arr.shape[0]}")
    return arr


def load_images_npz(path: str, flag: str = "SAMPLES") -> np.ndarray:
    """``arr_0`` of an ADM-layout .npz: uint8 (N, H, W, 3), N ≥ 2."""
    with _open_npz(path, flag) as d:
        if "arr_0" not in d.files:
            raise UsageError(f"{flag} {path} has no 'arr_0' array (found {d.files}); expected the ADM layout "
                             f"arr_0 = uint8 (N, H, W, 3)")
        return _check_images(d["arr_0"], path, flag)


@torch.no_grad()
def inception_features(net: FIDInceptionV3, images: np.ndarray, batch_size: int = 100, device="cpu",
                       progress: bool = True) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, 2048) float64 pool3 features."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        x = torch.from_numpy(images[i: i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        out.append(net(x).double().cpu().numpy())
    return np.concatenate(out)


def reference_stats(path: str, net, batch_size: int, device) -> Tuple[np.ndarray, np.ndarray]:
    mu, sigma, _ = _reference_stats(path, net, batch_size, device)
    return mu, sigma


def _reference_stats(path: str, net, batch_size: int, device) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
    """mu, sigma and the number of images they come from (None for a statistics file)."""
    with _open_npz(path, "--ref") as d:
        if "mu" in d.files and "sigma" in d.files:
            mu, sigma = d["mu"].astype(np.float64), d["sigma"].astype(np.float64)
            dim = FIDInceptionV3.feature_dim
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise UsageError(f"--ref {path}: mu must be ({dim},) and sigma ({dim}, {dim}), got {mu.shape}, "
                                 f"{sigma.shape}")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise UsageError(f"--ref {path}: mu/sigma contain non-finite values")
            return mu, sigma, None
        if "arr_0" not in d.files:
            raise UsageError(f"--ref {path} has neither 'mu' + 'sigma' nor 'arr_0' images (found {d.files})")
        images = _check_images(d["arr_0"], path, "--ref")
    return (*feature_stats(inception_features(net, images, batch_size, device)), len(images))


def small_set_warning(counts: Dict[str, Optional[int]], dim: int = FIDInceptionV3.feature_dim) -> Optional[str]:
    """The warning for sets of fewer images than feature dimensions (their covariance is singular, the
    Fréchet distance of such estimates is mostly bias), or None. ``counts``: set name → images (None: unknown)."""
    small = [f"{name} {n}" for name, n in counts.items() if n is not None and n < dim]
    if not small:
        return None
    return (f"warning: too few images for a reliable FID ({', '.join(small)}; fewer than the {dim} feature "
            f"dimensions, so the covariance is singular): the number below is not a usable estimate. Use at least "
            f"{dim} images per set; 10,000 or 50,000 is standard (ADM: 50,000 samples vs 10,000 reference images)")


def main(args) -> float:
    log = get_logger("fid", True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = load_images_npz(args.samples, "SAMPLES")
    net = load_fid_inception(args.inception_weights, device)
    mu_r, sigma_r, n_ref = _reference_stats(args.ref, net, args.batch_size, device)
    if args.save_ref_stats:
        save_npz(args.save_ref_stats, mu=mu_r, sigma=sigma_r)
    mu_s, sigma_s = feature_stats(inception_features(net, samples, args.batch_size, device))
    warning = small_set_warning({"samples": len(samples), "reference": n_ref})
    if warning:
        log.warning(warning)
    fid = frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
    log.info(f"FID {fid:.4f} ({len(samples)} samples of {samples.shape[1]}×{samples.shape[2]} vs {args.ref})")
    if args.out:
        save_json({"fid": fid, "num_samples": int(len(samples)), "samples": args.samples, "ref": args.ref}, args.out)
    return fid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-fid", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", metavar="SAMPLES", help="sample .npz (arr_0 uint8 (N, H, W, 3))")
    p.add_argument("--ref", required=True, help="reference .npz: mu + sigma, or arr_0 images")
    p.add_argument("--inception-weights", required=True, help="pt_inception-2015-12-05-6726825d.pth (a local file)")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--save-ref-stats", default=None, help="write the reference mu/sigma to this .npz")
    p.add_argument("--out", default=None, help="write {fid, ...} to this JSON file")
    return p


def check_args(args) -> None:
    for flag, path in (("SAMPLES", args.samples), ("--ref", args.ref), ("--inception-weights", args.inception_weights)):
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path} not found")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but CUDA is not available")


def cli(argv=None):
    return run_cli(build_parser(), check_args, main, argv)


def console() -> None:
    """The ``meanflow-fid`` command (exit status 0 on success; see ``common.run_command``)."""
    run_command(cli)


if __name__ == "__main__":
    console()
