"""Model weights: one file format and one loader for every network this package trains.

A model file is a safetensors file of the network's state dict whose metadata says how to rebuild it:

    format        "meanflow-fast/model-v1"
    architecture  a name in ``ARCHITECTURES`` ("MeanFlowDiT"), which maps it to (config class, model class)
    config        JSON of the config dataclass (every field)
    space         "latents": samples are VAE latents (a VAE decodes them into images), or
                  "pixels": samples are images; then ``pixel_range`` "[lo, hi]" (JSON) maps lo → 0 and
                  hi → 255 linearly, values outside clamped
    latent_norm   optional, "latents" only: the latent convention (``imagenet.latents.LATENT_NORMS``:
                  "sd-0.18215" or "imf-channel"); a latent file without it is "sd-0.18215"
    weights       optional: "ema" or "model" (which of a training run's weights these are)
    step          optional: the training step
    preset        optional: the preset name the model was built from

``save_model`` writes it (atomically, with the mode a plain ``open()`` gives); ``meanflow-demo`` writes
``meanflow_digits.safetensors`` and ``meanflow-train`` writes ``<results-dir>/ema.safetensors`` this way.
``load_model`` reads it, and also a meanflow-train checkpoint (NNNNNNN.json / NNNNNNN.safetensors, or a
run folder → its latest), so one loader serves every file: the returned network is in eval mode with
``requires_grad`` off. Another architecture joins through ``register_architecture``, without a change here.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .imagenet.checkpoint import CKPT_FORMAT, load_checkpoint, prefixed, resolve_checkpoint
from .imagenet.latents import DEFAULT_LATENT_NORM, check_latent_norm
from .io import load_json, save_safetensors
from .model import DiTConfig, MeanFlowDiT

__all__ = ["MODEL_FORMAT", "ARCHITECTURES", "SPACES", "ModelInfo", "register_architecture", "save_model",
           "load_model", "read_model_info"]

_FORMAT_PREFIX = "meanflow-fast/model-v"
MODEL_FORMAT = _FORMAT_PREFIX + "1"
SPACES = ("latents", "pixels")
WEIGHTS = ("ema", "model")
_REQUIRED = ("format", "architecture", "config", "space")
_WHERE_FROM = ("model files are written by meanflow_fast.save_model, meanflow-demo (meanflow_digits.safetensors) "
               "and meanflow-train (<results-dir>/ema.safetensors)")

# name → (config dataclass, model class built as model_class(config)); the name is what files record.
ARCHITECTURES: Dict[str, Tuple[type, type]] = {}


def register_architecture(name: str, config_class: type, model_class: type) -> None:
    """Make ``model_class`` (built as ``model_class(config)``, holding it as ``.config``) savable and
    loadable under ``name``; ``config_class`` is a dataclass whose fields are JSON values."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is registered already (to {ARCHITECTURES[name][1].__name__})")
    if not (isinstance(config_class, type) and is_dataclass(config_class)):
        raise ValueError(f"config_class must be a dataclass, got {config_class!r}")
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise ValueError(f"model_class must be an nn.Module subclass, got {model_class!r}")
    ARCHITECTURES[name] = (config_class, model_class)


register_architecture("MeanFlowDiT", DiTConfig, MeanFlowDiT)


@dataclass(frozen=True)
class ModelInfo:
    """What a weights file holds, read from its metadata (no tensors loaded). ``kind``: "model" (a model
    file; ``path`` is it) or "checkpoint" (a meanflow-train checkpoint; ``path`` is its JSON state file,
    ``weights`` None: it holds both sets)."""
    path: str
    kind: str
    architecture: str
    config: object
    space: str
    pixel_range: Optional[Tuple[float, float]] = None
    weights: Optional[str] = None
    step: Optional[int] = None
    preset: Optional[str] = None
    latent_norm: Optional[str] = None   # the latent convention of a "latents" model; None for "pixels"


# =================================================================================================
#                                              Save
# =================================================================================================
def _architecture_of(model: nn.Module) -> str:
    for name, (config_class, model_class) in ARCHITECTURES.items():
        if type(model) is model_class:
            if not isinstance(getattr(model, "config", None), config_class):
                raise ValueError(f"model.config must be a {config_class.__name__}, got "
                                 f"{type(getattr(model, 'config', None)).__name__}")
            return name
    raise ValueError(f"model must be an instance of a registered architecture ({', '.join(sorted(ARCHITECTURES))}; "
                     f"see register_architecture), got {type(model).__name__}")


def _check_pixel_range(pixel_range, what: str = "pixel_range") -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in pixel_range)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two numbers (lo, hi), got {pixel_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{what} must be two finite numbers lo < hi, got {pixel_range!r}")
    return lo, hi


def save_model(model: nn.Module, path: str, *, space: str = "latents",
               pixel_range: Optional[Tuple[float, float]] = None, weights: Optional[str] = None,
               step: Optional[int] = None, preset: Optional[str] = None,
               latent_norm: Optional[str] = None) -> None:
    """Write ``model``'s state dict and what rebuilds it to ``path`` (a .safetensors file), atomically.

    space: "latents" (samples are VAE latents) or "pixels" (samples are images); ``pixel_range`` (lo, hi),
    for "pixels" only, default (-1, 1), is the range that maps to 0…255. ``weights`` ("ema" or "model"),
    ``step`` (≥ 0), ``preset`` and ``latent_norm`` (space "latents" only) are recorded when given."""
    arch = _architecture_of(model)
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(".safetensors"):
        raise ValueError(f"path must be a file name ending in .safetensors, got {path!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    meta = {"format": MODEL_FORMAT, "architecture": arch, "config": json.dumps(asdict(model.config)),
            "space": space}
    if space == "pixels":
        meta["pixel_range"] = json.dumps(list(_check_pixel_range((-1.0, 1.0) if pixel_range is None else pixel_range)))
    elif pixel_range is not None:
        raise ValueError(f"pixel_range is for space='pixels' only, got pixel_range={pixel_range!r} with space={space!r}")
    if latent_norm is not None:
        if space != "latents":
            raise ValueError(f"latent_norm is for space='latents' only, got latent_norm={latent_norm!r} with "
                             f"space={space!r}")
        meta["latent_norm"] = check_latent_norm(latent_norm)
    if weights is not None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS} or None, got {weights!r}")
        meta["weights"] = weights
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int ≥ 0 or None, got {step!r}")
        meta["step"] = str(step)
    if preset is not None:
        if not isinstance(preset, str) or not preset:
            raise ValueError(f"preset must be a non-empty str or None, got {preset!r}")
        meta["preset"] = preset
    save_safetensors(model.state_dict(), str(path), metadata=meta)


# =================================================================================================
#                                     Read the metadata
# =================================================================================================
def _file_metadata(path: str) -> Dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); {_WHERE_FROM}") from e


def _build_config(config_class: type, raw, where: str):
    """``config_class(**raw)`` after checking the fields: every field present, no other, JSON types that
    fit the field's annotation (int, float, str, bool)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: config must be a JSON object, got {type(raw).__name__}")
    names = [f.name for f in fields(config_class)]
    unknown = sorted(set(raw) - set(names))
    missing = [n for n in names if n not in raw]
    if unknown or missing:
        raise ValueError(f"{where}: config does not match {config_class.__name__}: "
                         + "; ".join(s for s in (f"unknown field(s) {unknown}" if unknown else "",
                                                 f"missing field(s) {missing}" if missing else "") if s))
    for f in fields(config_class):
        v, kind = raw[f.name], f.type
        if isinstance(kind, str):  # a string annotation (``from __future__ import annotations``)
            kind = {"int": int, "float": float, "bool": bool, "str": str}.get(kind, kind)
        ok = {int: lambda: isinstance(v, int) and not isinstance(v, bool),
              float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
              bool: lambda: isinstance(v, bool), str: lambda: isinstance(v, str)}.get(kind, lambda: True)()
        if not ok:
            raise ValueError(f"{where}: config field {f.name!r} must be {kind.__name__}, got {v!r}")
    try:
        return config_class(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: config is not a valid {config_class.__name__} ({e})") from e


def _info_from_file(path: str, meta: Dict[str, str]) -> ModelInfo:
    fmt = meta.get("format")
    if fmt is not None and fmt != MODEL_FORMAT:
        if fmt.startswith(_FORMAT_PREFIX):
            raise ValueError(f"{path} has model format {fmt!r}, which this version of meanflow-fast cannot read "
                             f"(it reads {MODEL_FORMAT!r}); upgrade meanflow-fast")
        raise ValueError(f"{path} is not a meanflow-fast model file (format {fmt!r}, expected {MODEL_FORMAT!r}); "
                         f"{_WHERE_FROM}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{path} is a safetensors file without meanflow-fast model metadata (missing "
                         f"{', '.join(repr(k) for k in missing)}); {_WHERE_FROM}")
    arch = meta["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unknown architecture {arch!r} (known: {', '.join(sorted(ARCHITECTURES))}; "
                         f"another is added with meanflow_fast.weights.register_architecture)")
    try:
        raw = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: config metadata is not valid JSON ({e})") from e
    config = _build_config(ARCHITECTURES[arch][0], raw, path)
    space = meta["space"]
    if space not in SPACES:
        raise ValueError(f"{path}: space must be one of {SPACES}, got {space!r}")
    pixel_range = None
    if space == "pixels":
        if "pixel_range" not in meta:
            raise ValueError(f"{path}: a pixel-space model file needs 'pixel_range' in its metadata")
        try:
            pr = json.loads(meta["pixel_range"])
        except json.JSONDecodeError:
            pr = meta["pixel_range"]
        pixel_range = _check_pixel_range(pr, f"{path}: pixel_range")
    weights = meta.get("weights")
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"{path}: weights must be one of {WEIGHTS}, got {weights!r}")
    step = meta.get("step")
    if step is not None:
        if not step.isdigit():
            raise ValueError(f"{path}: step must be an integer ≥ 0, got {step!r}")
        step = int(step)
    latent_norm = None
    if space == "latents":
        try:
            latent_norm = check_latent_norm(meta.get("latent_norm", DEFAULT_LATENT_NORM), f"{path}: latent_norm")
        except ValueError as e:
            raise ValueError(str(e)) from None
    return ModelInfo(path=path, kind="model", architecture=arch, config=config, space=space,
                     pixel_range=pixel_range, weights=weights, step=step, preset=meta.get("preset") or None,
                     latent_norm=latent_norm)


def _info_from_checkpoint(json_path: str) -> ModelInfo:
    meta = load_json(json_path, "checkpoint state file")
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{json_path} is not a meanflow-train checkpoint (format {got!r}, expected "
                         f"{CKPT_FORMAT!r})")
    if "model_config" not in meta:
        raise ValueError(f"checkpoint state file {json_path} is malformed: no 'model_config'")
    # meanflow-train trains on VAE latents; checkpoints without these keys hold a MeanFlowDiT on sd-0.18215.
    arch = meta.get("architecture", "MeanFlowDiT")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{json_path}: unknown architecture {arch!r} (known: {', '.join(sorted(ARCHITECTURES))})")
    config = _build_config(ARCHITECTURES[arch][0], meta["model_config"], json_path)
    latent_norm = check_latent_norm(meta.get("latent_norm", DEFAULT_LATENT_NORM), f"{json_path}: latent_norm")
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    step = meta.get("step")
    return ModelInfo(path=json_path, kind="checkpoint", architecture=arch, config=config,
                     space="latents", step=step if isinstance(step, int) else None,
                     preset=args.get("preset") if isinstance(args.get("preset"), str) else None,
                     latent_norm=latent_norm)


def read_model_info(path: str) -> ModelInfo:
    """What ``path`` holds, from its metadata alone: a model file (.safetensors from ``save_model``), a
    meanflow-train checkpoint (its .json or .safetensors) or a run folder / checkpoints folder (→ the
    latest checkpoint). Raises ValueError saying what is wrong or missing."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path must be a non-empty str or os.PathLike, got {path!r}")
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"model file or checkpoint not found: {path} (expected a model .safetensors file, a "
                         f"meanflow-train checkpoint NNNNNNN.json / NNNNNNN.safetensors, or a run folder)")
    if os.path.isdir(path) or path.endswith(".json"):
        return _info_from_checkpoint(resolve_checkpoint(path))
    meta = _file_metadata(path)
    if meta.get("format") == CKPT_FORMAT:
        return _info_from_checkpoint(resolve_checkpoint(path))
    return _info_from_file(path, meta)


# =================================================================================================
#                                              Load
# =================================================================================================
def _check_state_dict(model: nn.Module, sd: Dict[str, torch.Tensor], where: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])

    def few(keys, show=lambda k: k):
        return ", ".join(show(k) for k in keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} tensor(s) of the wrong shape: "
                        + few(shapes, lambda k: f"{k} {tuple(sd[k].shape)} (expected {want[k]})"))
    if problems:
        raise ValueError(f"{where}: the weights do not fit the {type(model).__name__} its config describes: "
                         + "; ".join(problems))


def load_model(path: str, device="cpu", weights: str = "ema") -> nn.Module:
    """The network stored at ``path``, on ``device``, in eval mode with ``requires_grad`` off.

    ``path``: a model file (``save_model``, meanflow-demo, meanflow-train's ema.safetensors), a
    meanflow-train checkpoint (NNNNNNN.json or NNNNNNN.safetensors) or a run folder (→ its latest
    checkpoint). ``weights`` ("ema" or "model") picks a checkpoint's EMA or raw weights; a model file
    holds one set (``read_model_info(path).weights`` says which) and loads as saved."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    info = read_model_info(path)
    if info.kind == "checkpoint":
        _, tensors = load_checkpoint(info.path, map_location="cpu")
        sd = prefixed(tensors, weights)
        if not sd:
            raise ValueError(f"checkpoint {info.path} has no {weights!r} weights")
    else:
        try:
            sd = load_file(info.path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{info.path}: cannot read its tensors ({e})") from e
    model_class = ARCHITECTURES[info.architecture][1]
    try:
        model = model_class(info.config)
    except ValueError as e:
        raise ValueError(f"{info.path}: its config does not build a {model_class.__name__} ({e})") from e
    _check_state_dict(model, sd, info.path)
    model.load_state_dict(sd)
    return model.to(device).eval().requires_grad_(False)
