"""meanflow-sample: 1-NFE (or n-step) samples from a model file or a training checkpoint → ADM-layout .npz.

On CUDA the sampler is captured in a CUDA graph (``meanflow_fast.graph_sampler.GraphSampler``, one
graph per batch size); on a CPU it runs ``meanflow_fast.sample`` eagerly.

    torchrun --nproc_per_node 8 -m meanflow_fast.imagenet.sample \\
        --ckpt runs/xl2 --vae /models/sd-vae-ft-ema --num-samples 50000 --out samples/xl2_1nfe.npz
    meanflow-sample --ckpt demo_out/meanflow_digits.safetensors --num-samples 100 --out digits.npz

--ckpt is anything ``meanflow_fast.load_model`` reads: a model file (``save_model``, meanflow-demo,
meanflow-train's ema.safetensors), a meanflow-train checkpoint or a run folder (→ its latest checkpoint);
or an official iMF checkpoint (``iMF-B-2.pth`` …, a ``.pth`` read by ``imf.load_official_imf``).
The model's space decides --vae: a latent-space model (every meanflow-train model) needs --vae to decode
its samples; a pixel-space model (the demo's) samples images itself, and --vae with it is an error.
Latents are decoded in the model's recorded convention (imagenet/latents.py; an official iMF model's is
imf-channel). An iMF model samples with ``--omega``, ``--t-min``, ``--t-max`` (default: the official
setting of its size, ``meanflow_fast.sampling.IMF_GUIDANCE``); a MeanFlow model takes none of them.

Output: ``arr_0`` uint8 (N, H, W, 3) images (the layout of the ADM evaluation suite; a 1-channel pixel
model's grey values fill all three channels) and ``arr_1`` int64 (N,) class labels. Labels are balanced
(sample i has class i mod num_classes); sample i's noise comes from a generator seeded with (seed, i),
so the result does not depend on the number of processes or the batch size. Rank r makes a contiguous
slice; rank 0 gathers the slices (through files next to --out) and writes the .npz atomically.
"""
import argparse
import math
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import save_npz
from ..sampling import imf_settings, sample
from ..weights import ModelInfo, load_model, read_model_info
from .common import (UsageError, barrier, cleanup_distributed, get_logger, init_distributed, positive_int,
                     run_cli, run_command)
from .vae import check_vae_arg, decode_to_uint8, load_vae

__all__ = ["main", "build_parser", "check_args", "cli", "sample_noise", "pixels_to_uint8"]


def sample_noise(indices, shape, seed: int) -> torch.Tensor:
    """One N(0, I) draw of ``shape`` per global sample index, seeded by (seed, index)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                        for i in indices])


def _sampler(model, steps: int, amp, device, use_graph: bool = True, guidance=None):
    """``(y, noise) → latents``: the CUDA-graph sampler (meanflow_fast.graph_sampler) on CUDA, else
    meanflow_fast.sample; both compute z ← z − (t − r)·u(z, r, t | y) on the same grid. ``guidance``:
    an iMF model's {omega, t_min, t_max}."""
    guidance = guidance or {}
    if device.type == "cuda" and use_graph:
        try:
            from ..graph_sampler import GraphSampler
        except ImportError:
            GraphSampler = None
        if GraphSampler is not None:
            return GraphSampler(model, steps=steps, autocast_dtype=amp, **guidance)

    def eager(y, noise):
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            return sample(model, y, steps=steps, noise=noise, **guidance)
    return eager


def pixels_to_uint8(x: torch.Tensor, pixel_range) -> np.ndarray:
    """A pixel-space model's samples (B, C, H, W) → uint8 (B, H, W, 3): ``pixel_range`` (lo, hi) maps
    linearly to 0…255, values outside clamped; one channel (grey) fills all three."""
    lo, hi = pixel_range
    x = x.float()
    u8 = ((x.clamp(lo, hi) - lo) * (255.0 / (hi - lo))).round().to(torch.uint8)
    if u8.shape[1] == 1:
        u8 = u8.expand(-1, 3, -1, -1)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


def _weights_note(info, args) -> str:
    """What the log says is sampled: which weights of which file."""
    if info.kind == "official":
        return f"official iMF checkpoint {info.path}"
    if info.kind == "checkpoint":
        return f"{args.weights or 'ema'} weights of checkpoint {info.path}"
    step = "" if info.step is None else f", step {info.step}"
    return f"model file {info.path} ({info.weights or 'unrecorded'} weights{step})"


@torch.no_grad()
def main(args):
    env = init_distributed(args.device)
    log = get_logger("sample", env.is_main)
    device = env.device
    info = _model_info(args.ckpt)
    model = _load(args, info, device)
    guidance = {}
    if info.architecture == "IMFDiT":
        try:
            omega, t_min, t_max = imf_settings(model, args.steps, args.omega, args.t_min, args.t_max, tensors=False)
        except ValueError as e:
            raise UsageError(f"--omega/--t-min/--t-max: {e}") from e
        guidance = dict(omega=omega, t_min=t_min, t_max=t_max)
    vae = load_vae(args.vae, device) if info.space == "latents" else None
    cfg = model.config
    per_rank = math.ceil(args.num_samples / env.world_size)
    lo, hi = min(env.rank * per_rank, args.num_samples), min((env.rank + 1) * per_rank, args.num_samples)
    amp = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else None
    log.info(f"sampling {args.num_samples} images ({args.steps} step(s), {_weights_note(info, args)}, "
             f"{info.space}) on {env.world_size} rank(s), {per_rank} per rank; {cfg.num_classes} classes")
    if vae is not None:
        log.info(f"decoding with the VAE {args.vae}, latents in the {info.latent_norm} convention")
    if guidance:
        log.info(f"iMF guidance: ω {guidance['omega']}, interval [{guidance['t_min']}, {guidance['t_max']}]")
    images, labels = [], []
    bar = tqdm(total=hi - lo, desc="sample", unit="img", dynamic_ncols=True, disable=not env.is_main)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    draw = _sampler(model, args.steps, amp, device, use_graph=not args.no_cuda_graph, guidance=guidance)
    for start in range(lo, hi, args.batch_size):
        idx = torch.arange(start, min(start + args.batch_size, hi))
        y = (idx % cfg.num_classes).to(device)
        noise = sample_noise(idx, shape, args.seed).to(device)
        z = draw(y, noise)
        if vae is not None:
            images.append(decode_to_uint8(vae, z.float(), info.latent_norm).cpu().numpy())
        else:
            images.append(pixels_to_uint8(z, info.pixel_range))
        labels.append(y.cpu().numpy())
        bar.update(len(idx))
    bar.close()
    h, w = (images[0].shape[1:3] if images else (0, 0))
    arr = np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)
    lab = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    out = os.path.abspath(args.out)
    if env.distributed:
        part = f"{out}.part-{env.rank:05d}.npz"
        save_npz(part, arr_0=arr, arr_1=lab)
        barrier()
        if env.is_main:
            parts = [f"{out}.part-{r:05d}.npz" for r in range(env.world_size)]
            loaded = [np.load(p) for p in parts]
            arr = np.concatenate([d["arr_0"] for d in loaded if len(d["arr_0"])])
            lab = np.concatenate([d["arr_1"] for d in loaded if len(d["arr_1"])])
            for d in loaded:
                d.close()
    if env.is_main:
        if arr.shape[0] != args.num_samples:  # pragma: no cover - guarded by the slicing above
            raise RuntimeError(f"gathered {arr.shape[0]} samples, expected {args.num_samples}")
        save_npz(out, arr_0=arr, arr_1=lab.astype(np.int64))
        if env.distributed:
            for r in range(env.world_size):
                os.remove(f"{out}.part-{r:05d}.npz")
        log.info(f"wrote {out}: arr_0 {arr.dtype} {arr.shape}, arr_1 labels")
    barrier()
    cleanup_distributed()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="model file (.safetensors from save_model, meanflow-demo or meanflow-train's ema.safetensors), "
                        "training checkpoint (.json/.safetensors), run folder (→ its latest checkpoint) or an "
                        "official iMF checkpoint (.pth)")
    p.add_argument("--omega", type=float, default=None,
                   help="iMF models only: guidance scale ω ≥ 1 (default: the official setting of the model's size)")
    p.add_argument("--t-min", type=float, default=None, help="iMF models only: guidance interval start")
    p.add_argument("--t-max", type=float, default=None, help="iMF models only: guidance interval end")
    p.add_argument("--input-size", type=positive_int, default=32,
                   help="official iMF checkpoints only: the latent side (32 for ImageNet 256), which the file "
                        "does not record")
    p.add_argument("--vae", default=None,
                   help="diffusers AutoencoderKL (hub id or local directory) that decodes a latent-space model's "
                        "samples: required for those, not allowed for a pixel-space model")
    p.add_argument("--out", default="samples.npz", help="output .npz (arr_0 uint8 (N, H, W, 3), arr_1 labels)")
    p.add_argument("--num-samples", type=positive_int, default=50_000)
    p.add_argument("--batch-size", type=positive_int, default=250, help="per rank")
    p.add_argument("--steps", type=positive_int, default=1, help="function evaluations (1 = 1-NFE)")
    p.add_argument("--weights", choices=("ema", "model"), default=None,
                   help="a training checkpoint's EMA (default) or raw weights; not for a model file, which "
                        "holds one set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on CUDA")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--no-cuda-graph", action="store_true", help="sample eagerly on CUDA (no graph capture)")
    return p


def _is_official(ckpt: str) -> bool:
    return str(ckpt).endswith((".pth", ".pt"))


def _model_info(ckpt: str) -> ModelInfo:
    """What --ckpt holds, from its metadata; an official iMF .pth has none: an IMFDiT on imf-channel
    latents (config read when it is loaded)."""
    if _is_official(ckpt):
        if not os.path.isfile(ckpt):
            raise UsageError(f"--ckpt {ckpt}: no such file (expected an official iMF checkpoint .pth)")
        return ModelInfo(path=ckpt, kind="official", architecture="IMFDiT", config=None, space="latents",
                         latent_norm="imf-channel")
    try:
        return read_model_info(ckpt)
    except ValueError as e:
        raise UsageError(f"--ckpt: {e}") from e


def _load(args, info: ModelInfo, device):
    """The network of --ckpt, in eval mode without gradients."""
    try:
        if info.kind == "official":
            from ..imf import load_official_imf
            state = torch.load(info.path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"{info.path} holds a {type(state).__name__}, not a state dict")
            model = load_official_imf(state, device=device, input_size=args.input_size)
            return model.eval().requires_grad_(False)
        return load_model(args.ckpt, device, weights=args.weights or "ema")
    except (ValueError, RuntimeError, OSError) as e:  # torch.load's unpickling errors are RuntimeErrors
        raise UsageError(f"--ckpt {args.ckpt}: {e}") from e


def check_args(args) -> None:
    """Every argument, the --ckpt file's metadata and the --vae rule, before any work."""
    info = _model_info(args.ckpt)
    if not args.out.endswith(".npz"):
        raise UsageError(f"--out must end with .npz, got {args.out!r}")
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory; give a file name ending in .npz")
    if args.weights is not None and info.kind == "official":
        raise UsageError(f"--weights {args.weights}: --ckpt {args.ckpt} is an official iMF checkpoint, which holds "
                         f"one set of weights; leave out --weights")
    if args.input_size != 32 and info.kind != "official":
        raise UsageError(f"--input-size is for an official iMF checkpoint (.pth), which does not record it; "
                         f"--ckpt {args.ckpt} records its own")
    given = [f for f, v in (("--omega", args.omega), ("--t-min", args.t_min), ("--t-max", args.t_max)) if v is not None]
    if given and info.architecture != "IMFDiT":
        raise UsageError(f"{', '.join(given)}: sampling settings of an iMF model; --ckpt {args.ckpt} is a "
                         f"{info.architecture} (a MeanFlow model's guidance is part of its training)")
    if args.omega is not None and not (math.isfinite(args.omega) and args.omega >= 1):
        raise UsageError(f"--omega must be a finite number ≥ 1 (1 = no guidance), got {args.omega}")
    lo = 0.0 if args.t_min is None else args.t_min
    hi = 1.0 if args.t_max is None else args.t_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise UsageError(f"--t-min and --t-max must satisfy 0 ≤ t_min ≤ t_max ≤ 1, got {args.t_min} and {args.t_max}")
    if args.weights is not None and info.kind == "model":
        raise UsageError(f"--weights {args.weights}: --weights picks the weights of a training checkpoint, but "
                         f"--ckpt {args.ckpt} is a model file, which holds one set "
                         f"({info.weights or 'unrecorded'}); leave out --weights")
    if info.space == "latents":
        if args.vae is None:
            raise UsageError(f"--vae is required: --ckpt {args.ckpt} is a latent-space model, whose samples a "
                             f"VAE decodes (pass --vae DIR, a diffusers AutoencoderKL directory, or a hub id)")
        check_vae_arg(args.vae)
    else:
        if args.vae is not None:
            raise UsageError(f"--vae {args.vae}: --ckpt {args.ckpt} is a pixel-space model, whose samples are "
                             f"images already; leave out --vae")
        channels = info.config.in_channels
        if channels not in (1, 3):
            raise UsageError(f"--ckpt {args.ckpt}: a pixel-space model with {channels} channels cannot be written "
                             f"as images (1 = grey or 3 = RGB)")


def cli(argv=None):
    return run_cli(build_parser(), check_args, main, argv)


def console() -> None:
    """The ``meanflow-sample`` command (exit status 0 on success; see ``common.run_command``)."""
    run_command(cli)


if __name__ == "__main__":
    console()
