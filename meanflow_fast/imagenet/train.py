"""meanflow-train: MeanFlow or iMF on ImageNet-256 SD-VAE latents, torchrun + DDP (or one process).

    torchrun --nproc_per_node 8 -m meanflow_fast.imagenet.train \\
        --data-path /data/imagenet-latents --results-dir runs/xl2 --preset XL/2 --vae /models/sd-vae-ft-ema
    torchrun --nproc_per_node 8 -m meanflow_fast.imagenet.train --method imf \\
        --data-path /data/imagenet-latents-imf --results-dir runs/imf-b2 --preset B/2 --vae /models/sd-vae-ft-mse

``--method meanflow`` (default) trains a MeanFlowDiT with MeanFlowLoss; ``--method imf`` an IMFDiT
(``imf.imf_dit(preset)``) with IMFLoss, its defaults from ``config.IMF_TRAIN_PRESETS`` (the official iMF
recipe, with a linear learning-rate warm-up over ``--warmup-epochs``). The model is trained in the data's
latent convention (imagenet/latents.py), which checkpoints and ema.safetensors record.

Every hyper-parameter flag left out takes the preset's value from ``config.TRAIN_PRESETS`` (the paper's:
global batch 256, Adam (0.9, 0.95), lr 1e−4, EMA 0.9999, 240 epochs, ω, κ and the guidance interval per
preset). One process per GPU; nccl on CUDA, gloo on CPU; without torchrun it runs as one process.

Determinism and resumption: the data order is a function of (--global-seed, epoch) only
(DistributedSampler); each rank's loss generator is seeded with global_seed · world_size + rank; a
checkpoint stores the model, EMA, optimizer, step, data position and every RNG state of every rank, so
``--resume latest`` continues exactly where the run stopped (bit-for-bit on CPU, same world size).
"""
import argparse
import inspect
import logging
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ..io import atomic_write, remove_stale_tmp
from ..loss import MeanFlowLoss, check_settings
from ..model import DiTConfig, MeanFlowDiT
from ..sampling import sample
from ..training import EMA, BadStepCounter, MeanFlowObjective, NonFiniteTrainingError, train_step
from ..weights import save_model
from .checkpoint import (capture_rng, checkpoint_path, load_checkpoint, optimizer_from_tensors, prefixed,
                         resolve_checkpoint, restore_rng, save_checkpoint)
from .common import (DistEnv, UsageError, barrier, cleanup_distributed, get_logger, init_distributed, nonneg_int,
                     positive_float, positive_int, resolve_backend, run_cli, run_command)
from .config import IMF_TRAIN_PRESETS, TRAIN_PRESETS
from .latents import LATENT_NORMS
from .data import LatentShards, ResumableDistributedSampler
from .vae import check_vae_arg

__all__ = ["main", "build_parser", "check_args", "cli", "HYPER_FLAGS", "MUST_MATCH_ON_RESUME", "EMA_FILE"]

# Flags whose default (None) is filled from TRAIN_PRESETS[--preset].
HYPER_FLAGS = ("depth", "hidden_size", "num_heads", "global_batch_size", "lr", "adam_betas", "weight_decay",
               "ema_decay", "epochs", "omega", "kappa", "guidance_interval", "class_dropout", "time_mu",
               "time_sigma", "ratio_r_neq_t", "adaptive_p", "adaptive_c")
# --method imf: the flags filled from IMF_TRAIN_PRESETS[--preset]; the first group is MeanFlow's only.
IMF_HYPER_FLAGS = ("global_batch_size", "lr", "warmup_epochs", "adam_betas", "weight_decay", "ema_decay", "epochs",
                   "precision", "class_dropout", "time_mu", "time_sigma", "ratio_r_neq_t", "omega_max", "adaptive_p",
                   "adaptive_c", "sample_omega", "sample_t_min", "sample_t_max")
MEANFLOW_ONLY = ("depth", "hidden_size", "num_heads", "omega", "kappa", "guidance_interval")
IMF_ONLY = ("omega_max", "sample_omega", "sample_t_min", "sample_t_max")
# A resumed run must agree with its checkpoint on these (they define the model and the data order).
MUST_MATCH_ON_RESUME = ("method", "preset", "depth", "hidden_size", "num_heads", "global_batch_size", "global_seed")
# The EMA weights of the latest checkpoint as a model file (meanflow_fast.load_model, meanflow-sample --ckpt).
EMA_FILE = "ema.safetensors"


# =================================================================================================
#                                            Helpers
# =================================================================================================
def _parse_steps(spec: str):
    """'3,5-7' → {3, 5, 6, 7} (the hidden --debug-nan-steps flag)."""
    out = set()
    for part in filter(None, spec.split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def _gather_objects(obj, env):
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def peak_memory_note(device: torch.device) -> str:
    """' | peak mem X GiB' for the log line: this rank's peak of allocated CUDA memory so far (what
    ``torch.cuda.max_memory_allocated`` reports; the caching allocator reserves somewhat more); '' on CPU."""
    if device.type != "cuda":
        return ""
    return f" | peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def _sum_over_ranks(values, env):
    t = torch.tensor(values, dtype=torch.float64, device=env.device if dist.is_initialized() and
                     dist.get_backend() == "nccl" else "cpu")
    if env.distributed:
        dist.all_reduce(t)
    return t.tolist()


def _grid_png(images_uint8: np.ndarray, path: str, nrow: int) -> None:
    """(n, h, w, 3) uint8 → one PNG, written atomically."""
    from PIL import Image
    n, h, w, _ = images_uint8.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = images_uint8[i]
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def latents_to_uint8(z: torch.Tensor) -> np.ndarray:
    """Without a VAE: the first 3 latent channels, min-max scaled over the batch, as (n, h, w, 3)."""
    z = z[:, :3].float()
    if z.shape[1] < 3:
        z = torch.cat([z, z[:, :1].expand(-1, 3 - z.shape[1], -1, -1)], 1)
    z = (z - z.amin()) / (z.amax() - z.amin()).clamp_min(1e-8)
    return (z * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# =================================================================================================
#                                              Main
# =================================================================================================
def _precompile_kernels(model, loss_fn, local_batch, amp, device, log):
    """Compile every Triton kernel variant of the training step on all CPU threads before the first step
    (meanflow_fast/kernels/precompile.py), instead of one after another inside it. Runs the loss and its gradients once
    on a random batch of the step's shape with the kernel launches recorded, not run; nothing is updated
    and neither the data order nor any RNG stream of the run is touched (its own generator), so resumed
    runs stay bit-exact. MeanFlowLoss and IMFLoss are both called as the step calls them,
    ``loss_fn(model, x, y, generator=...)`` with float32 latents x and labels y."""
    from ..kernels.precompile import precompile
    c = model.config
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(local_batch, c.in_channels, c.input_size, c.input_size, device=device, generator=g)
    y = torch.randint(0, c.num_classes, (local_batch,), device=device, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            loss, _ = loss_fn(model, x, y, generator=g)
        return torch.autograd.grad(loss, params, allow_unused=True)
    precompile(step, log=log.info)


@dataclass
class FaultPlan:
    """The faults the reliability tests inject, all set by the hidden ``--debug-*`` flags: a NaN in the
    batch of chosen steps, a pause after every step (time to SIGKILL the run between checkpoints) and a
    SIGKILL inside one checkpoint's write (tensors file written, state file not)."""
    nan_steps: frozenset = frozenset()
    step_delay: float = 0.0
    crash_in_checkpoint: Optional[int] = None

    @classmethod
    def from_args(cls, args) -> "FaultPlan":
        try:
            nan_steps = frozenset(_parse_steps(args.debug_nan_steps or ""))
        except ValueError:
            raise UsageError(f"--debug-nan-steps must look like '3,5-7', got {args.debug_nan_steps!r}")
        return cls(nan_steps, args.debug_step_delay, args.debug_crash_in_checkpoint)

    def batch(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """The batch of ``step`` (counted from 1), poisoned with a NaN when the plan says so."""
        if step not in self.nan_steps:
            return x
        x = x.clone()
        x[0] = float("nan")
        return x

    def after_step(self) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)

    def checkpoint_crash(self, step: int):
        """``save_checkpoint``'s crash hook for the checkpoint of ``step``: None, or a SIGKILL of this process."""
        if self.crash_in_checkpoint != step:
            return None
        return lambda: os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Run:
    """What setup builds and the resume, loop and checkpoint functions share; ``step``, ``epoch`` and
    ``pos`` (batches into the epoch) are the data position, ``bad`` counts the skipped steps."""
    args: argparse.Namespace
    env: DistEnv
    log: logging.Logger
    backend: str
    amp: Optional[torch.dtype]
    ckpt_dir: str
    data: LatentShards
    sampler: ResumableDistributedSampler
    local_batch: int
    steps_per_epoch: int
    max_steps: int
    warmup_steps: int
    config: object      # DiTConfig or IMFConfig
    model: nn.Module    # MeanFlowDiT or IMFDiT
    ema: EMA
    loss_fn: nn.Module  # MeanFlowLoss or IMFLoss
    objective: nn.Module
    opt: torch.optim.Optimizer
    seed: int
    loss_gen: torch.Generator
    bad: BadStepCounter
    step: int = 0
    epoch: int = 0
    pos: int = 0

    @property
    def architecture(self) -> str:
        return "IMFDiT" if self.args.method == "imf" else "MeanFlowDiT"

    def set_lr(self) -> None:
        """The learning rate of the next update: a linear warm-up from 0 over ``warmup_steps`` updates
        (the official iMF schedule: update k of the warm-up takes lr·k/warmup_steps), then constant."""
        if self.warmup_steps:
            lr = self.args.lr * min(1.0, self.step / self.warmup_steps)
            for group in self.opt.param_groups:
                group["lr"] = lr

    def advance(self) -> None:
        """One batch consumed: the step and the data position move on."""
        self.step += 1
        self.pos += 1
        if self.pos == self.steps_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0


# ------------------------------------------------------------------------------------------- setup
def _open_run_dir(args, env: DistEnv) -> str:
    """Rank 0 makes checkpoints/ and samples/ and clears temp files a kill left; returns checkpoints/."""
    ckpt_dir = os.path.join(args.results_dir, "checkpoints")
    if env.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        os.makedirs(os.path.join(args.results_dir, "samples"), exist_ok=True)
        remove_stale_tmp(ckpt_dir)
        remove_stale_tmp(args.results_dir, EMA_FILE + ".*")
    barrier()
    return ckpt_dir


def _open_data(args, env: DistEnv):
    """(data, sampler, local batch, steps per sampler epoch, total steps, warm-up steps)."""
    data = LatentShards(args.data_path, seed=args.global_seed)
    if args.latent_norm is not None and args.latent_norm != data.latent_norm:
        raise UsageError(f"--latent-norm {args.latent_norm}: the latents in --data-path {args.data_path} are in the "
                         f"{data.latent_norm} convention; extract them again with --latent-norm {args.latent_norm}, "
                         f"or leave out --latent-norm to train in the data's convention")
    local_batch = args.global_batch_size // env.world_size
    # Posterior shards (mean + std): the sampler yields (index, epoch), and each item is a fresh draw.
    sampler = ResumableDistributedSampler(data, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                          seed=args.global_seed, drop_last=True, with_epoch=data.posterior)
    steps_per_epoch = sampler.num_samples // local_batch  # sampler epochs: every image and its flip once
    if steps_per_epoch == 0:
        raise UsageError(f"--global-batch-size {args.global_batch_size} is larger than the data allows: "
                         f"{len(data)} latents (with flips) over {env.world_size} rank(s)")
    # --epochs counts passes over the images (the paper's 240); the flips double the items per sampler epoch.
    max_steps = args.max_steps or math.ceil(args.epochs * data.num_images / args.global_batch_size)
    warmup_steps = math.ceil(args.warmup_epochs * data.num_images / args.global_batch_size)
    _, h, w = data.latent_shape
    if h != w:
        raise UsageError(f"--data-path: latents must be square, got {h}×{w}")
    return data, sampler, local_batch, steps_per_epoch, max_steps, warmup_steps


def _build_model(args, env: DistEnv, data: LatentShards, backend: str):
    """(config, model, EMA, loss, objective: the DDP-wrapped model + loss, optimizer)."""
    C, h, _ = data.latent_shape
    torch.manual_seed(args.global_seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    if args.method == "imf":
        from ..imf import IMFLoss, imf_dit
        try:
            model = imf_dit(args.preset, input_size=h, in_channels=C, num_classes=data.num_classes).to(env.device)
            model.backend = backend
        except ValueError as e:
            raise UsageError(f"--preset {args.preset} with the latents of --data-path ({C}×{h}×{h}): {e}") from e
        config = model.config
        loss_fn = IMFLoss(num_classes=data.num_classes, time_mu=args.time_mu, time_sigma=args.time_sigma,
                          ratio_r_neq_t=args.ratio_r_neq_t, omega_max=args.omega_max,
                          class_dropout=args.class_dropout, adaptive_p=args.adaptive_p, adaptive_c=args.adaptive_c,
                          validate=False)  # labels were range-checked when the shards were opened
    else:
        config = DiTConfig(input_size=h, patch_size=2, in_channels=C, hidden_size=args.hidden_size,
                           depth=args.depth, num_heads=args.num_heads, num_classes=data.num_classes)
        model = MeanFlowDiT(config, backend=backend).to(env.device)
        loss_fn = MeanFlowLoss(num_classes=data.num_classes, time_mu=args.time_mu, time_sigma=args.time_sigma,
                               ratio_r_neq_t=args.ratio_r_neq_t, omega=args.omega, kappa=args.kappa,
                               guidance_interval=tuple(args.guidance_interval), class_dropout=args.class_dropout,
                               adaptive_p=args.adaptive_p, adaptive_c=args.adaptive_c,
                               validate=False)  # labels were range-checked when the shards were opened: no per-step sync
    ema = EMA(model, decay=args.ema_decay)
    # DDP wraps model + loss together: its forward runs the whole loss (forward_jvp included), so its
    # backward hooks all-reduce every gradient (see meanflow_fast.training).
    objective = MeanFlowObjective(model, loss_fn)
    if env.distributed:
        # Not static_graph=True: it breaks forward_jvp. The only buffer (pos_embed) is constant: no sync
        # before each forward. torch 2.13 calls that switch forward_sync_buffers (and warns on
        # broadcast_buffers); older torch knows only broadcast_buffers.
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                   else "broadcast_buffers")
        objective = DDP(objective, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                        **{no_sync: False})
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.adam_betas),
                           weight_decay=args.weight_decay, fused=env.device.type == "cuda")
    ema.update(model, decay=0.0)  # EMA starts as a copy of the (broadcast) weights
    return config, model, ema, loss_fn, objective, opt


def _setup(args):
    """(run, the sample grids' VAE or None, ``--resume``'s checkpoint or None): process group, data,
    model, optimizer, this rank's seeded RNG streams, the VAE and the checkpoint, all opened and checked
    before the run folder and its log are made, so a usage error leaves --results-dir as it was."""
    env = init_distributed(args.device)
    device = env.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backend = resolve_backend(args.backend, device)
    amp = torch.bfloat16 if (device.type == "cuda" and args.precision == "bf16") else None
    data, sampler, local_batch, steps_per_epoch, max_steps, warmup_steps = _open_data(args, env)
    config, model, ema, loss_fn, objective, opt = _build_model(args, env, data, backend)
    seed = args.global_seed * env.world_size + env.rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    loss_gen = torch.Generator(device=device).manual_seed(seed)
    vae = _load_grid_vae(args, env)
    checkpoint = _read_checkpoint(args, env, config, data.latent_norm) if args.resume else None
    ckpt_dir = _open_run_dir(args, env)
    log = get_logger("train", env.is_main, os.path.join(args.results_dir, "log.txt"))
    run = _Run(args=args, env=env, log=log, backend=backend, amp=amp, ckpt_dir=ckpt_dir, data=data,
               sampler=sampler, local_batch=local_batch, steps_per_epoch=steps_per_epoch, max_steps=max_steps,
               warmup_steps=warmup_steps, config=config, model=model, ema=ema, loss_fn=loss_fn, objective=objective, opt=opt, seed=seed,
               loss_gen=loss_gen, bad=BadStepCounter(args.max_bad_steps))
    return run, vae, checkpoint


def _load_grid_vae(args, env: DistEnv):
    """Rank 0's VAE that decodes the sample grids (``--vae`` with ``--sample-every``), else None."""
    if env.is_main and args.vae and args.sample_every:
        from .vae import load_vae
        return load_vae(args.vae, env.device)
    return None


# ------------------------------------------------------------------------------------------ resume
def _read_checkpoint(args, env: DistEnv, config, latent_norm: str) -> Tuple[str, dict, Dict[str, torch.Tensor]]:
    """``--resume``'s checkpoint (JSON path, state, tensors), checked against this run."""
    jpath = resolve_checkpoint(args.resume, args.results_dir)
    meta, tensors = load_checkpoint(jpath, map_location=env.device)
    saved = meta.get("args", {})
    diff = {k: (saved.get(k), getattr(args, k)) for k in MUST_MATCH_ON_RESUME
            if k in saved and _as_json(saved.get(k)) != _as_json(getattr(args, k))}
    if meta["model_config"] != asdict(config):
        diff["model_config"] = (meta["model_config"], asdict(config))
    saved_norm = meta.get("latent_norm", "sd-0.18215")  # the only convention before it was recorded
    if saved_norm != latent_norm:
        diff["latent_norm (of --data-path)"] = (saved_norm, latent_norm)
    if diff:
        raise UsageError(f"--resume {jpath}: the checkpoint does not match this run: " +
                         "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items()))
    return jpath, meta, tensors


def _resume(run: _Run, jpath: str, meta: dict, tensors: Dict[str, torch.Tensor]) -> None:
    """Load the checkpoint (from ``_read_checkpoint``) into the run: weights, EMA, optimizer, data
    position, skipped-step count and (same world size) every RNG stream of this rank."""
    env = run.env
    run.model.load_state_dict(prefixed(tensors, "model"))
    run.ema.load_state_dict(prefixed(tensors, "ema"))
    optimizer_from_tensors(run.opt, tensors, meta["optimizer_param_groups"])
    run.step, run.epoch, run.pos = int(meta["step"]), int(meta["epoch"]), int(meta["epoch_pos"])
    run.bad.total = int(meta.get("skipped_total", 0))
    if int(meta.get("world_size", -1)) == env.world_size:
        restore_rng(prefixed(tensors, f"rng.{env.rank}"), meta["rng"][env.rank], run.loss_gen)
    else:
        run.log.warning(f"warning: checkpoint written with world size {meta.get('world_size')}, now "
                        f"{env.world_size}: RNG streams are reseeded (the run continues, not bit-for-bit)")
        run.loss_gen.manual_seed(run.seed + 7919 * run.step)
    del tensors
    if run.pos >= run.steps_per_epoch:  # a different world size can shorten the epoch
        run.epoch, run.pos = run.epoch + 1, 0
    run.log.info(f"resumed from {jpath}: step {run.step}, epoch {run.epoch}, batch {run.pos} of "
                 f"{run.steps_per_epoch}")


# ------------------------------------------------------------------------- checkpoints, sample grids
def _save(run: _Run, faults: FaultPlan) -> None:
    """Checkpoint at ``run.step``: every rank's RNG states gathered, rank 0 writes, all wait for it."""
    env = run.env
    rt, rj = capture_rng(run.loss_gen)
    all_rt, all_rj = _gather_objects(rt, env), _gather_objects(rj, env)
    if env.is_main:
        state = {"epoch": run.epoch, "epoch_pos": run.pos, "steps_per_epoch": run.steps_per_epoch,
                 "world_size": env.world_size, "model_config": asdict(run.config),
                 "args": {k: _as_json(v) for k, v in vars(run.args).items()}, "skipped_total": run.bad.total,
                 "backend": run.backend, "architecture": run.architecture, "latent_norm": run.data.latent_norm,
                 "vae": run.data.meta.get("vae")}
        path = save_checkpoint(run.ckpt_dir, run.step, model=run.model, ema_model=run.ema.model, optimizer=run.opt,
                               state=state, rng_tensors=[{k: v.cpu() for k, v in d.items()} for d in all_rt],
                               rng_json=all_rj, keep_last=run.args.keep_last,
                               crash_hook=faults.checkpoint_crash(run.step))
        run.log.info(f"saved checkpoint {path}")
        # The EMA weights as a model file (meanflow_fast.weights) beside every checkpoint, not only the last:
        # a quarter of the checkpoint's bytes (no raw weights, no Adam moments), and a stopped run leaves
        # a model file of its latest checkpoint.
        export = os.path.join(run.args.results_dir, EMA_FILE)
        save_model(run.ema.model, export, space="latents", weights="ema", step=run.step, preset=run.args.preset,
                   latent_norm=run.data.latent_norm)
        run.log.info(f"saved EMA weights of step {run.step} to {export}")
    barrier()


class _SampleGrid:
    """The EMA model's samples of a fixed noise and label set, written by rank 0 as one PNG per call
    (decoded by ``--vae``, else the first latent channels). Draws from its own generator only."""

    def __init__(self, run: _Run, vae=None):
        args, data = run.args, run.data
        self.run, self.vae = run, vae
        g = torch.Generator().manual_seed(args.global_seed + 1)
        self.n = min(args.sample_count, 64)
        self.y = (torch.arange(self.n) * max(1, data.num_classes // max(1, self.n))) % data.num_classes
        self.noise = torch.randn((self.n, *data.latent_shape), generator=g)

    def __call__(self, step: int) -> None:
        run = self.run
        if not run.env.is_main:
            return
        device, amp = run.env.device, run.amp
        args = run.args
        guidance = (dict(omega=args.sample_omega, t_min=args.sample_t_min, t_max=args.sample_t_max)
                    if args.method == "imf" else {})
        with torch.no_grad(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            z = sample(run.ema.model, self.y.to(device), noise=self.noise.to(device), **guidance).float()
        if self.vae is not None:
            from .vae import decode_to_uint8
            imgs = decode_to_uint8(self.vae, z, run.data.latent_norm).cpu().numpy()
        else:
            imgs = latents_to_uint8(z)
        path = os.path.join(run.args.results_dir, "samples", f"{step:07d}.png")
        _grid_png(imgs, path, nrow=int(math.ceil(math.sqrt(self.n))))
        run.log.info(f"wrote sample grid {path}")


# -------------------------------------------------------------------------------------------- loop
class _Progress:
    """The loss of the steps since the last log line, summed over the ranks when it is logged."""

    def __init__(self, run: _Run):
        self.run = run
        # MeanFlow: the raw loss (mean squared error of u); iMF: those of the u- and the v-head.
        self.keys = ("loss", "loss_u", "loss_v") if run.args.method == "imf" else ("loss", "raw_loss")
        self.names = ("loss", "loss u", "loss v") if run.args.method == "imf" else ("loss", "raw loss")
        self.acc = [0.0] * (len(self.keys) + 2)  # the keys' sums, finite steps, steps
        self.t_log, self.step_log = time.time(), run.step

    def observe(self, stats: Dict[str, float]) -> None:
        if not stats["skipped"]:
            for i, k in enumerate(self.keys):
                self.acc[i] += stats[k]
            self.acc[-2] += 1
        self.acc[-1] += 1

    def log(self, stats: Dict[str, float]) -> None:
        run = self.run
        device = run.env.device
        if device.type == "cuda":
            torch.cuda.synchronize()
        *sums, n_ok, _ = _sum_over_ranks(self.acc, run.env)
        dt = time.time() - self.t_log
        ips = (run.step - self.step_log) * run.args.global_batch_size / max(dt, 1e-9)
        losses = " | ".join(f"{name} {v / max(n_ok, 1):.4f}" for name, v in zip(self.names, sums))
        lr = f" | lr {run.opt.param_groups[0]['lr']:.3g}" if run.warmup_steps else ""
        run.log.info(f"step {run.step:07d}/{run.max_steps} | {losses} | {ips:.1f} images/s | grad norm "
                     f"{stats['grad_norm']:.3g}{lr} | skipped {run.bad.total} | epoch {run.epoch}"
                     f"{peak_memory_note(device)}")
        self.acc, self.t_log, self.step_log = [0.0] * len(self.acc), time.time(), run.step


def _train_loop(run: _Run, loader: DataLoader, grid: _SampleGrid, faults: FaultPlan) -> None:
    """Steps until ``max_steps``: a non-finite step is skipped and counted, ``--max-bad-steps`` in a row
    raise NonFiniteTrainingError; logs, sample grids and checkpoints at their intervals."""
    args, device = run.args, run.env.device
    progress = _Progress(run)
    if device.type == "cuda" and run.backend == "triton" and run.step < run.max_steps:
        _precompile_kernels(run.model, run.loss_fn, run.local_batch, run.amp, device, run.log)
    run.objective.train()
    while run.step < run.max_steps:
        run.sampler.set_position(run.epoch, run.pos * run.local_batch)
        for x, y in loader:
            x = faults.batch(run.step + 1, x.to(device, non_blocking=True))
            y = y.to(device, non_blocking=True)
            run.set_lr()
            stats = train_step(run.objective, None, run.opt, x, y, ema=run.ema, generator=run.loss_gen,
                               autocast_dtype=run.amp, max_grad_norm=args.max_grad_norm)
            run.advance()
            skipped = bool(stats["skipped"])
            if skipped:
                run.log.warning(f"warning: step {run.step}: non-finite loss or gradient, step skipped "
                                f"({run.bad.consecutive + 1} in a row, {run.bad.total + 1} in total)")
            run.bad.observe(skipped, run.step)
            progress.observe(stats)
            faults.after_step()
            if run.step % args.log_every == 0 or run.step == run.max_steps:
                progress.log(stats)
            if args.sample_every and run.step % args.sample_every == 0:
                grid(run.step)
            if run.step % args.ckpt_every == 0 or run.step == run.max_steps:
                _save(run, faults)
            if run.step >= run.max_steps:
                break


def main(args):
    """Train (``args`` checked by ``check_args``); returns the last checkpoint's JSON path."""
    faults = FaultPlan.from_args(args)
    run, vae, checkpoint = _setup(args)
    if checkpoint is not None:
        _resume(run, *checkpoint)
        del checkpoint  # its tensors are in the model, the EMA and the optimizer now
    grid = _SampleGrid(run, vae)
    loader = DataLoader(run.data, batch_size=run.local_batch, sampler=run.sampler, num_workers=args.num_workers,
                        pin_memory=run.env.device.type == "cuda", drop_last=True,
                        generator=torch.Generator().manual_seed(run.seed))
    _log_run(run)
    try:
        _train_loop(run, loader, grid, faults)
    except NonFiniteTrainingError as e:
        run.log.error(f"error: {e}")
        cleanup_distributed()
        raise SystemExit(f"meanflow-train: {e}")
    run.log.info(f"done: {run.step} steps, {run.bad.total} skipped; checkpoints in {run.ckpt_dir}")
    barrier()
    run.objective = None  # DDP's reducer goes before the process group it holds
    cleanup_distributed()
    return checkpoint_path(run.ckpt_dir, run.step)[1]


def _log_run(run: _Run) -> None:
    args, data = run.args, run.data
    C, h, w = data.latent_shape
    n_params = sum(p.numel() for p in run.model.parameters())
    name = "iMF" if args.method == "imf" else "MeanFlow"
    run.log.info(f"{name} {args.preset}: {n_params / 1e6:.1f}M parameters, latents {C}×{h}×{w}, "
                 f"{data.num_classes} classes, {data.num_images} images (+ flips); {run.env.world_size} rank(s) × "
                 f"batch {run.local_batch}; {run.steps_per_epoch} steps per (image + flip) epoch; {run.max_steps} "
                 f"steps; backend {run.backend}, {'bf16 autocast' if run.amp else 'fp32'} on {run.env.device.type}")
    meta = data.meta
    run.log.info(f"latents: {data.latent_norm} convention, "
                 f"{'a fresh posterior draw per use' if data.posterior else meta.get('latent_mode', 'mean')} "
                 f"(latent_mode {meta.get('latent_mode', 'mean')}), VAE {meta.get('vae', 'unrecorded')}")
    flags = IMF_HYPER_FLAGS if args.method == "imf" else HYPER_FLAGS + ("warmup_epochs", "precision")
    run.log.info("hyper-parameters: " + ", ".join(f"{k}={getattr(args, k)}" for k in flags))


def _as_json(v):
    """A flag's value as the checkpoint's JSON holds it (tuples become lists)."""
    return list(v) if isinstance(v, tuple) else v


# =================================================================================================
#                                              CLI
# =================================================================================================
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meanflow-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="folder of latent shards from meanflow-extract")
    p.add_argument("--results-dir", required=True, help="run folder: checkpoints/, samples/, log.txt, ema.safetensors")
    p.add_argument("--method", choices=("meanflow", "imf"), default="meanflow",
                   help="meanflow: MeanFlowDiT + MeanFlowLoss (default); imf: IMFDiT + IMFLoss (Improved MeanFlow)")
    p.add_argument("--preset", choices=list(dict.fromkeys([*TRAIN_PRESETS, *IMF_TRAIN_PRESETS])), default="B/2",
                   help="model and hyper-parameter preset (of --method)")
    p.add_argument("--latent-norm", choices=LATENT_NORMS, default=None,
                   help="the latent convention the model must be trained in: a usage error if --data-path's "
                        "differs (default: the data's, recorded by meanflow-extract)")
    p.add_argument("--resume", default=None, help="checkpoint (.json/.safetensors), run folder, or 'latest'")
    g = p.add_argument_group("model (default: the preset's; MeanFlow only, iMF takes imf.IMF_PRESETS[--preset])")
    g.add_argument("--depth", type=positive_int)
    g.add_argument("--hidden-size", type=positive_int)
    g.add_argument("--num-heads", type=positive_int)
    g.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="dual-stream ops: auto = fused Triton on CUDA if it imports, else torch")
    g.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="autocast on CUDA (CPU: fp32); default bf16 for MeanFlow, fp32 for iMF (the official)")
    g = p.add_argument_group("optimisation (default: the preset's)")
    g.add_argument("--global-batch-size", type=positive_int)
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--warmup-epochs", type=float,
                   help="linear learning-rate warm-up from 0 over this many passes over the images (default: "
                        "0 for MeanFlow, 10 for iMF)")
    g.add_argument("--adam-betas", type=float, nargs=2, metavar=("BETA1", "BETA2"))
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--epochs", type=positive_float, help="passes over the images (default 240)")
    g.add_argument("--max-steps", type=positive_int, help="overrides --epochs")
    g.add_argument("--max-grad-norm", type=positive_float, default=None, help="clip gradients (default: off)")
    g = p.add_argument_group("MeanFlow loss (default: the preset's)")
    g.add_argument("--omega", type=float, help="guidance ω")
    g.add_argument("--kappa", type=float, help="guidance κ")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"))
    g.add_argument("--class-dropout", type=float)
    g.add_argument("--time-mu", type=float)
    g.add_argument("--time-sigma", type=float)
    g.add_argument("--ratio-r-neq-t", type=float)
    g.add_argument("--adaptive-p", type=float)
    g.add_argument("--adaptive-c", type=float)
    g = p.add_argument_group("iMF loss and sample grid (--method imf; default: the preset's)")
    g.add_argument("--omega-max", type=float, help="training guidance scales ω = omega_max^U (default 8)")
    g.add_argument("--sample-omega", type=float, help="ω of the sample grid (default 7.5)")
    g.add_argument("--sample-t-min", type=float, help="guidance interval start of the sample grid (default 0.4)")
    g.add_argument("--sample-t-max", type=float, help="guidance interval end of the sample grid (default 0.65)")
    g = p.add_argument_group("run")
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--num-workers", type=nonneg_int, default=4)
    g.add_argument("--log-every", type=positive_int, default=100)
    g.add_argument("--ckpt-every", type=positive_int, default=50_000)
    g.add_argument("--keep-last", type=nonneg_int, default=0, help="keep only the newest N checkpoints (0: all)")
    g.add_argument("--sample-every", type=nonneg_int, default=10_000, help="sample grid every N steps (0: never)")
    g.add_argument("--sample-count", type=positive_int, default=16, help="images in the sample grid (≤ 64)")
    g.add_argument("--vae", default=None, help="decode sample grids with this VAE (else: latent channels 0-2)")
    g.add_argument("--max-bad-steps", type=positive_int, default=20,
                   help="stop after this many consecutive steps with a non-finite loss or gradient")
    g.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    # Fault injection for the reliability tests (hidden; read by FaultPlan).
    p.add_argument("--debug-nan-steps", default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--debug-crash-in-checkpoint", type=int, default=None, help=argparse.SUPPRESS)
    return p


def fill_defaults(args) -> None:
    """Fill every hyper-parameter flag left out from the preset of ``--method``: TRAIN_PRESETS or
    IMF_TRAIN_PRESETS[args.preset]. A flag of the other method only is a usage error."""
    imf = args.method == "imf"
    table = IMF_TRAIN_PRESETS if imf else TRAIN_PRESETS
    if args.preset not in table:
        raise UsageError(f"--preset {args.preset} is not a preset of --method {args.method} (allowed: "
                         f"{', '.join(table)})")
    other = [k for k in (MEANFLOW_ONLY if imf else IMF_ONLY) if getattr(args, k) is not None]
    if other:
        raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in other)}: not a setting of --method "
                         f"{args.method} ({'MeanFlow' if imf else 'iMF'} only)")
    preset = table[args.preset]
    defaults = dict(warmup_epochs=0.0, precision="bf16") if not imf else {}
    for k in (IMF_HYPER_FLAGS if imf else HYPER_FLAGS + ("warmup_epochs", "precision")):
        if getattr(args, k) is None:
            v = preset[k] if k in preset else defaults[k]
            setattr(args, k, list(v) if isinstance(v, tuple) else v)


def check_args(args) -> None:
    fill_defaults(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch_size % world:
        raise UsageError(f"--global-batch-size ({args.global_batch_size}) must be divisible by the number of "
                         f"processes ({world})")
    if not 0.0 <= args.ema_decay < 1.0:
        raise UsageError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    b1, b2 = args.adam_betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise UsageError(f"--adam-betas must both be in [0, 1), got {b1} {b2}")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be ≥ 0, got {args.weight_decay}")
    if not (math.isfinite(args.warmup_epochs) and args.warmup_epochs >= 0):
        raise UsageError(f"--warmup-epochs must be a finite number ≥ 0, got {args.warmup_epochs}")
    if args.method == "imf":
        _check_imf_args(args)
    else:
        _check_meanflow_args(args)
    if not os.path.isdir(args.data_path):
        raise UsageError(f"--data-path {args.data_path} does not exist or is not a directory (expected the "
                         f"latent shards written by meanflow-extract)")
    if os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        raise UsageError(f"--results-dir {args.results_dir} exists and is not a directory")
    if args.resume:
        resolve_checkpoint(args.resume, args.results_dir)
    if args.vae and args.sample_every:
        check_vae_arg(args.vae)
    FaultPlan.from_args(args)


def _check_meanflow_args(args) -> None:
    try:
        check_settings(time_sigma=args.time_sigma, ratio_r_neq_t=args.ratio_r_neq_t, omega=args.omega,
                       kappa=args.kappa, guidance_interval=tuple(args.guidance_interval),
                       class_dropout=args.class_dropout,
                       adaptive_p=args.adaptive_p, adaptive_c=args.adaptive_c,
                       name=lambda setting: "--" + setting.replace("_", "-"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.hidden_size % args.num_heads:
        raise UsageError(f"--hidden-size ({args.hidden_size}) must be divisible by --num-heads ({args.num_heads})")


def _check_imf_args(args) -> None:
    if not (math.isfinite(args.omega_max) and args.omega_max >= 1):
        raise UsageError(f"--omega-max must be a finite number ≥ 1, got {args.omega_max}")
    try:
        check_settings(time_sigma=args.time_sigma, ratio_r_neq_t=args.ratio_r_neq_t, guidance_interval=(0.0, 1.0),
                       class_dropout=args.class_dropout, adaptive_p=args.adaptive_p, adaptive_c=args.adaptive_c,
                       name=lambda setting: "--" + setting.replace("_", "-"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not (math.isfinite(args.sample_omega) and args.sample_omega >= 1):
        raise UsageError(f"--sample-omega must be a finite number ≥ 1, got {args.sample_omega}")
    if not 0.0 <= args.sample_t_min <= args.sample_t_max <= 1.0:
        raise UsageError(f"--sample-t-min and --sample-t-max must satisfy 0 ≤ t_min ≤ t_max ≤ 1, got "
                         f"{args.sample_t_min} and {args.sample_t_max}")


def cli(argv=None):
    return run_cli(build_parser(), check_args, main, argv)


def console() -> None:
    """The ``meanflow-train`` command (exit status 0 on success; see ``common.run_command``)."""
    run_command(cli)


if __name__ == "__main__":
    console()
