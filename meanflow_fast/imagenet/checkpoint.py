"""Training checkpoints: a safetensors file of tensors + a small JSON state file, both atomic.

    <results-dir>/checkpoints/0050000.safetensors   model.*, ema.*, optim.<param>.<name>,
                                                    rng.<rank>.{torch,cuda,loss_gen} (uint8 states)
    <results-dir>/checkpoints/0050000.json          step, data position (epoch, batches into it),
                                                    args, model config, optimizer param groups,
                                                    python/numpy RNG states per rank, size of the
                                                    tensors file

The tensors file is written first and the JSON last: a checkpoint exists once its JSON does, and the
JSON records the tensors file's size, so a truncated or swapped file is caught on load. Each write is
``io.atomic_write`` (temp file, fsync, rename), so a kill at any moment leaves the previous checkpoints
intact. Nothing non-finite is ever written (``save_checkpoint`` refuses).
"""
import os
import random
import re
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import load_json, remove_stale_tmp, save_json, save_safetensors
from .common import UsageError

__all__ = ["CKPT_FORMAT", "checkpoint_path", "list_checkpoints", "resolve_checkpoint", "save_checkpoint",
           "load_checkpoint", "optimizer_to_tensors", "optimizer_from_tensors", "capture_rng", "restore_rng",
           "prefixed"]

CKPT_FORMAT = "meanflow-train-ckpt-v1"
_NAME = re.compile(r"^(\d{7,})\.json$")


def checkpoint_path(ckpt_dir: str, step: int) -> Tuple[str, str]:
    """(tensors path, JSON path) of the checkpoint at ``step``."""
    base = os.path.join(ckpt_dir, f"{step:07d}")
    return base + ".safetensors", base + ".json"


def list_checkpoints(ckpt_dir: str) -> List[int]:
    """Steps of the checkpoints in ``ckpt_dir`` (those with a JSON state file), ascending."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(m.group(1)) for m in map(_NAME.match, os.listdir(ckpt_dir)) if m)


def resolve_checkpoint(spec: str, results_dir: Optional[str] = None) -> str:
    """The JSON path of a checkpoint given as "latest" (in ``results_dir``), a .json or .safetensors
    file, a run folder or a checkpoints folder (→ its latest)."""
    if not isinstance(spec, str) or not spec:
        raise UsageError(f"--resume/--ckpt must be a checkpoint path or 'latest', got {spec!r}")
    if spec == "latest":
        if results_dir is None:
            raise UsageError("'latest' needs a --results-dir to look in")
        spec = results_dir
    if os.path.isdir(spec):
        d = os.path.join(spec, "checkpoints") if os.path.isdir(os.path.join(spec, "checkpoints")) else spec
        steps = list_checkpoints(d)
        if not steps:
            raise UsageError(f"no checkpoint found in {d} (expected NNNNNNN.json + NNNNNNN.safetensors written "
                             f"by meanflow-train)")
        return checkpoint_path(d, steps[-1])[1]
    if spec.endswith(".safetensors"):
        spec = spec[: -len(".safetensors")] + ".json"
    if not os.path.isfile(spec):
        raise UsageError(f"checkpoint not found: {spec} (pass NNNNNNN.json or NNNNNNN.safetensors written by "
                         f"meanflow-train, a run folder, or 'latest')")
    return spec


def prefixed(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------------- optimizer
def optimizer_to_tensors(opt: torch.optim.Optimizer) -> Tuple[Dict[str, torch.Tensor], list]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if not torch.is_tensor(v):
                v = torch.tensor(v)
            tensors[f"optim.{pid}.{name}"] = v
    return tensors, sd["param_groups"]


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: Dict[str, torch.Tensor], param_groups: list) -> None:
    state: Dict[int, dict] = {}
    for k, v in prefixed(tensors, "optim").items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for g in param_groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": param_groups})


# ----------------------------------------------------------------------------------- RNG states
def capture_rng(loss_gen: Optional[torch.Generator]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """This process's RNG states: uint8 tensors (torch, cuda, the loss generator) and a JSON part
    (python ``random``, numpy)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    if loss_gen is not None:
        tensors["loss_gen"] = loss_gen.get_state()
    v, st, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    js = {"python": [v, list(st), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, js


def restore_rng(tensors: Dict[str, torch.Tensor], js: dict, loss_gen: Optional[torch.Generator]) -> None:
    tensors = {k: v.cpu() for k, v in tensors.items()}  # RNG states are CPU ByteTensors, wherever loaded
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    if loss_gen is not None and "loss_gen" in tensors:
        loss_gen.set_state(tensors["loss_gen"])
    v, st, gauss = js["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------- save / load
def _all_finite(tensors: Dict[str, torch.Tensor]) -> List[str]:
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(ckpt_dir: str, step: int, *, model: torch.nn.Module, ema_model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict, rng_tensors: List[Dict[str, torch.Tensor]],
                    rng_json: List[dict], keep_last: int = 0, crash_hook=None) -> str:
    """Write the checkpoint of ``step`` (rank 0 only); returns the JSON path. ``rng_*``: one entry
    per rank. ``keep_last`` > 0 deletes all but the newest ``keep_last`` checkpoints afterwards."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema_model.state_dict().items()})
    opt_tensors, groups = optimizer_to_tensors(optimizer)
    tensors.update(opt_tensors)
    bad = _all_finite(tensors)
    if bad:
        raise RuntimeError(f"refusing to write a checkpoint with non-finite values in {bad[:5]} "
                           f"({len(bad)} tensor(s)) at step {step}")
    for r, rt in enumerate(rng_tensors):
        tensors.update({f"rng.{r}.{k}": v for k, v in rt.items()})
    tpath, jpath = checkpoint_path(ckpt_dir, step)
    save_safetensors(tensors, tpath, metadata={"format": CKPT_FORMAT, "step": str(step)})
    if crash_hook is not None:
        crash_hook()  # tests: die between the two files
    meta = {"format": CKPT_FORMAT, "step": step, "tensors_file": os.path.basename(tpath),
            "tensors_bytes": os.path.getsize(tpath), "optimizer_param_groups": groups, "rng": rng_json,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **state}
    save_json(meta, jpath)
    if keep_last > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            for p in checkpoint_path(ckpt_dir, old)[::-1]:  # JSON first: the checkpoint is gone at once
                if os.path.exists(p):
                    os.remove(p)
    remove_stale_tmp(ckpt_dir)
    return jpath


def load_checkpoint(json_path: str, map_location="cpu") -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(state dict from the JSON, tensors); every failure names the file and what is wrong."""
    try:
        meta = load_json(json_path, "checkpoint state file")
    except FileNotFoundError as e:
        raise UsageError(str(e))
    except ValueError as e:
        raise UsageError(str(e))
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        raise UsageError(f"{json_path} is not a meanflow-train checkpoint (format "
                         f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}, "
                         f"expected {CKPT_FORMAT!r})")
    for key in ("step", "tensors_file", "tensors_bytes", "model_config"):
        if key not in meta:
            raise UsageError(f"checkpoint state file {json_path} is malformed: no {key!r}")
    tpath = os.path.join(os.path.dirname(json_path), meta["tensors_file"])
    if not os.path.isfile(tpath):
        raise UsageError(f"checkpoint {json_path}: its tensors file {tpath} is missing")
    size = os.path.getsize(tpath)
    if size != meta["tensors_bytes"]:
        raise UsageError(f"checkpoint {json_path}: tensors file {tpath} is truncated or was replaced "
                         f"({size} bytes, the state file recorded {meta['tensors_bytes']})")
    try:
        tensors = load_file(tpath, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"checkpoint {json_path}: tensors file {tpath} is corrupt ({e})")
    return meta, tensors
