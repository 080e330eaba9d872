"""Data: ImageFolder listing, the ADM center crop, latent shards and a resumable distributed sampler.

Latent shard format (``shard-00000.safetensors``, written by ``meanflow-extract``)::

    latents       float32 (n, 4, s/8, s/8)   the center-cropped image's VAE latent in the ``latent_norm``
                                             convention (imagenet/latents.py): the posterior's mean, or
                                             one stored draw (``latent_mode`` "sample")
    latents_flip  float32 (n, 4, s/8, s/8)   the same for the horizontally flipped image
    latents_std, latents_flip_std            ``latent_mode`` "mean-std" only: the posterior's std, in
                  float32 (n, 4, s/8, s/8)   the same convention; the loader draws mean + std·ε per use
    labels        int64   (n,)               class index (sorted class-folder order)
    metadata      format, image_size, latent_scale, latent_norm, latent_mode, vae, num_classes, expected,
                  skipped (a shard without latent_norm is "sd-0.18215", the only convention before it)

A shard covers a fixed range of the sorted file list; images that cannot be decoded are skipped and
counted (``skipped``), so n ≤ the shard size.
"""
import bisect
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch.utils.data import Dataset, DistributedSampler

from ..io import save_safetensors
from .common import UsageError
from .latents import DEFAULT_LATENT_NORM

__all__ = ["IMG_EXTENSIONS", "SHARD_FORMAT", "list_image_folder", "center_crop_arr", "ImageFolderImages",
           "collate_skip_bad", "shard_name", "write_shard", "read_shard_meta", "list_shards", "LatentShards",
           "ResumableDistributedSampler", "posterior_noise"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpe")
SHARD_FORMAT = "meanflow-latents-v1"


# =================================================================================================
#                                        ImageFolder
# =================================================================================================
def list_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``root/<class>/**/<image>`` → (sorted (path, label) list, sorted class names), torchvision's
    ImageFolder order. Errors name the path and what was expected."""
    if not isinstance(root, str) or not root:
        raise UsageError(f"--data-path must be a directory path, got {root!r}")
    if not os.path.isdir(root):
        raise UsageError(f"--data-path {root} does not exist or is not a directory (expected an ImageFolder: "
                         f"one sub-folder per class with images inside)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UsageError(f"--data-path {root} has no class folders (expected an ImageFolder: one sub-folder "
                         f"per class with images inside)")
    files = []
    for label, c in enumerate(classes):
        for d, subdirs, names in sorted(os.walk(os.path.join(root, c), followlinks=True)):
            subdirs.sort()
            for n in sorted(names):
                if n.lower().endswith(IMG_EXTENSIONS):
                    files.append((os.path.join(d, n), label))
    if not files:
        raise UsageError(f"--data-path {root} has class folders but no images with extensions {IMG_EXTENSIONS}")
    return files, classes


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM / DiT preprocessing: halve with a box filter while the short side is ≥ 2× the target,
    resize bicubically so the short side is ``image_size``, then crop the center. Returns uint8
    (image_size, image_size, 3)."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be an int ≥ 1, got {image_size!r}")
    img = pil_image.convert("RGB")
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


class ImageFolderImages(Dataset):
    """(path, label) items → (float (3, s, s) in [−1, 1], label, index), or None for an image that
    cannot be decoded (a corrupt or truncated file): ``collate_skip_bad`` drops and counts those."""

    def __init__(self, items: Sequence[Tuple[str, int]], image_size: int):
        self.items, self.image_size = list(items), image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im.load()  # decode fully here: a truncated file fails now, not later
                arr = center_crop_arr(im, self.image_size)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, … for bad files
            return (None, (path, f"{type(e).__name__}: {e}"), i)
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1.0
        return (x, label, i)


def collate_skip_bad(batch):
    """Stack the good items; return (x, labels, indices, [(index, path, reason), ...] of bad ones)."""
    good = [b for b in batch if b[0] is not None]
    bad = [(b[2], *b[1]) for b in batch if b[0] is None]
    if good:
        x = torch.stack([b[0] for b in good])
        y = torch.tensor([b[1] for b in good], dtype=torch.int64)
        idx = torch.tensor([b[2] for b in good], dtype=torch.int64)
    else:
        x, y, idx = None, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return x, y, idx, bad


# =================================================================================================
#                                        Latent shards
# =================================================================================================
def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def write_shard(path: str, latents: torch.Tensor, latents_flip: torch.Tensor, labels: torch.Tensor,
                meta: Dict[str, object], stds: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """Write one shard atomically (a killed extraction never leaves a half shard under its name).
    ``stds``: (latents_std, latents_flip_std), the posterior's std for ``latent_mode`` "mean-std"."""
    if latents.dim() != 4 or latents_flip.shape != latents.shape or labels.shape != (latents.shape[0],):
        raise ValueError(f"latents (n, C, h, w), latents_flip of the same shape and labels (n,) expected, got "
                         f"{tuple(latents.shape)}, {tuple(latents_flip.shape)}, {tuple(labels.shape)}")
    tensors = {"latents": latents.float(), "latents_flip": latents_flip.float(), "labels": labels.long()}
    if stds is not None:
        if any(s.shape != latents.shape for s in stds):
            raise ValueError(f"stds must be two tensors of the latents' shape {tuple(latents.shape)}, got "
                             f"{[tuple(s.shape) for s in stds]}")
        tensors.update(latents_std=stds[0].float(), latents_flip_std=stds[1].float())
    md = {"format": SHARD_FORMAT, **{k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}}
    save_safetensors(tensors, path, metadata=md)


def read_shard_meta(path: str) -> Dict[str, object]:
    """Metadata and size of a shard; raises UsageError naming the file if it is not a valid shard."""
    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
            keys = set(f.keys())
            shape = f.get_slice("latents").get_shape() if "latents" in keys else None
            n_labels = f.get_slice("labels").get_shape()[0] if "labels" in keys else None
    except FileNotFoundError:
        raise UsageError(f"latent shard not found: {path}")
    except Exception as e:
        raise UsageError(f"{path} is not a valid latent shard (cannot read it as safetensors: {e})")
    if md.get("format") != SHARD_FORMAT or not {"latents", "latents_flip", "labels"} <= keys:
        raise UsageError(f"{path} is not a valid latent shard (expected format {SHARD_FORMAT!r} with tensors "
                         f"latents, latents_flip, labels; got format {md.get('format')!r}, tensors {sorted(keys)})")
    out = {k: (v if k in ("format", "vae", "latent_mode", "latent_norm") else json.loads(v)) for k, v in md.items()}
    out.setdefault("latent_norm", DEFAULT_LATENT_NORM)
    if out.get("latent_mode") == "mean-std" and not {"latents_std", "latents_flip_std"} <= keys:
        raise UsageError(f"{path} is not a valid latent shard (latent_mode 'mean-std' needs the tensors latents_std "
                         f"and latents_flip_std; got {sorted(keys)})")
    out["count"] = int(shape[0])
    out["latent_shape"] = tuple(int(s) for s in shape[1:])
    if n_labels != out["count"]:
        raise UsageError(f"{path} is not a valid latent shard ({out['count']} latents but {n_labels} labels)")
    return out


def list_shards(data_path: str) -> List[str]:
    if not os.path.isdir(data_path):
        raise UsageError(f"--data-path {data_path} does not exist or is not a directory (expected a folder of "
                         f"latent shards written by meanflow-extract)")
    shards = sorted(os.path.join(data_path, n) for n in os.listdir(data_path)
                    if n.startswith("shard-") and n.endswith(".safetensors"))
    if not shards:
        raise UsageError(f"--data-path {data_path} has no latent shards (shard-*.safetensors); run "
                         f"meanflow-extract first")
    return shards


def posterior_noise(seed: int, epoch: int, index: int, shape) -> torch.Tensor:
    """The N(0, I) draw of item ``index`` in sampler epoch ``epoch``: a function of (seed, epoch, index)
    only, so it does not depend on the rank, the DataLoader worker, the batch size or resumption."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63)
    return torch.randn(shape, generator=g)


class LatentShards(Dataset):
    """All shards of a folder as one dataset of 2·N items: item 2i is image i, item 2i + 1 its
    horizontally flipped copy. Returns (latent float32 (C, h, w), label int64).

    ``posterior`` (True for "mean-std" shards) says the shards hold the posterior's mean and std: an item
    is then a fresh draw mean + std·ε, ε = ``posterior_noise(seed, epoch, index)``; index it with
    ``(index, epoch)`` (what ``ResumableDistributedSampler(with_epoch=True)`` yields), a plain index being
    epoch 0. Other shards return the stored latent, whatever the epoch.

    Shards are memory-mapped lazily (safetensors ``safe_open``), so N can exceed RAM."""

    def __init__(self, data_path: str, num_classes: Optional[int] = None, seed: int = 0):
        self.paths = list_shards(data_path)
        metas = [read_shard_meta(p) for p in self.paths]
        shapes = {m["latent_shape"] for m in metas if m["count"]}
        if len(shapes) != 1:
            raise UsageError(f"--data-path {data_path}: shards disagree on the latent shape ({sorted(shapes)}) "
                             f"or every shard is empty")
        self.latent_shape = shapes.pop()
        self.meta = metas[0]
        for key in ("latent_norm", "latent_mode"):
            if len({m.get(key) for m in metas}) != 1:
                raise UsageError(f"--data-path {data_path}: shards disagree on {key} "
                                 f"({sorted(map(str, {m.get(key) for m in metas}))})")
        self.latent_norm = self.meta["latent_norm"]
        self.posterior = self.meta.get("latent_mode") == "mean-std"
        self.seed = int(seed)
        ncls = {m.get("num_classes") for m in metas}
        if len(ncls) != 1:
            raise UsageError(f"--data-path {data_path}: shards disagree on num_classes ({sorted(map(str, ncls))})")
        self.num_classes = int(num_classes if num_classes is not None else ncls.pop())
        counts = [m["count"] for m in metas]
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_images = int(self.cum[-1])
        self._files: Dict[int, object] = {}
        # Labels are small: load them all now and check their range once.
        self.labels = torch.cat([self._open(k).get_tensor("labels") for k in range(len(self.paths))]) \
            if self.num_images else torch.zeros(0, dtype=torch.int64)
        if self.num_images and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise UsageError(f"--data-path {data_path}: labels out of range: found [{int(self.labels.min())}, "
                             f"{int(self.labels.max())}], allowed [0, {self.num_classes})")
        self._files.clear()  # re-opened lazily in each DataLoader worker

    def _open(self, k: int):
        f = self._files.get(k)
        if f is None:
            f = self._files[k] = safe_open(self.paths[k], framework="pt")
        return f

    def __len__(self):
        return 2 * self.num_images

    def __getitem__(self, j):
        j, epoch = j if isinstance(j, tuple) else (j, 0)
        if not 0 <= j < 2 * self.num_images:
            raise IndexError(f"index {j} out of range [0, {2 * self.num_images})")
        i, flip = divmod(int(j), 2)
        k = bisect.bisect_right(self.cum, i) - 1
        off = i - int(self.cum[k])
        name = "latents_flip" if flip else "latents"
        z = self._open(k).get_slice(name)[off: off + 1][0]
        if self.posterior:
            std = self._open(k).get_slice(name + "_std")[off: off + 1][0]
            z = z + std * posterior_noise(self.seed, int(epoch), int(j), z.shape)
        return z, self.labels[i]

    def __getstate__(self):  # DataLoader workers get a copy without open handles
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (deterministic given seed and epoch) that can start mid-epoch:
    ``set_position(epoch, start)`` skips the first ``start`` indices of this rank's epoch order.
    ``with_epoch``: yield (index, epoch) pairs, for LatentShards' per-epoch posterior draws."""

    def __init__(self, *args, with_epoch: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0
        self.with_epoch = with_epoch

    def set_position(self, epoch: int, start: int) -> None:
        if start < 0 or start > self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())[self.start:]
        return iter([(j, self.epoch) for j in order] if self.with_epoch else order)

    def __len__(self) -> int:
        return self.num_samples - self.start
