"""The official iMF PyTorch checkpoints (``iMF-{B,M,L,XL}-2.pth``) in and out of ``IMFDiT``.

The released files are the state dict of the official inference wrapper: its ``imfDiT`` under ``net.``,
without the v-head's blocks (eval mode) but with the (then unused) v final layer. Its linears wrap an
``nn.Linear`` as ``_flax_linear``; otherwise the names differ from ours by a few renames:

    ours                              official
    x_embedder.{weight,bias}          x_embedder.proj.{weight,bias}
    h_embedder.mlp.0.weight           h_embedder.mlp.0._flax_linear.weight        (omega_embedder alike)
    t_min_embedder / t_max_embedder   cfg_t_start_embedder / cfg_t_end_embedder
    y_embedder.embedding_table.weight y_embedder.embedding_table._flax_embedding.weight
    trunk / u_blocks / v_blocks .i.   shared_blocks / u_heads / v_heads .i.
      attn_gate / mlp_gate              attn_scale / mlp_scale
      attn.q_proj.weight                attn.q_proj._flax_linear.weight            (k, v, out; mlp.w1/w2/w3)
    u_final / v_final                 u_final_layer / v_final_layer (linear → linear._flax_linear)
    *_tokens, norms' weight           the same

The architecture is read from the shapes: width and token counts from the prefix tokens, channels and
patch from the patch conv, classes from the label table, the head dim from the QK-norm weight, the trunk
and head depths from the block indices, the SwiGLU width from w1, the v-head from whether its blocks are
there. The latent side is not in the weights (RoPE and the patch grid hold no parameters): 32 for the
released models, ``input_size`` otherwise.
"""
import os
import re
from collections import OrderedDict
from dataclasses import replace
from typing import Dict, List, Mapping, Union

import torch

from .model import IMFConfig, IMFDiT

PREFIX = "net."
_RENAMES = [  # (our pattern, official replacement), applied in order to one parameter name
    (r"^x_embedder\.(weight|bias)$", r"x_embedder.proj.\1"),
    (r"^t_min_embedder\.", "cfg_t_start_embedder."),
    (r"^t_max_embedder\.", "cfg_t_end_embedder."),
    (r"^(\w+_embedder)\.mlp\.(\d)\.(weight|bias)$", r"\1.mlp.\2._flax_linear.\3"),
    (r"^y_embedder\.embedding_table\.weight$", "y_embedder.embedding_table._flax_embedding.weight"),
    (r"^trunk\.", "shared_blocks."),
    (r"^u_blocks\.", "u_heads."),
    (r"^v_blocks\.", "v_heads."),
    (r"\.attn_gate$", ".attn_scale"),
    (r"\.mlp_gate$", ".mlp_scale"),
    (r"\.(attn\.(?:q|k|v|out)_proj|mlp\.w[123])\.weight$", r".\1._flax_linear.weight"),
    (r"^([uv])_final\.linear\.(weight|bias)$", r"\1_final_layer.linear._flax_linear.\2"),
    (r"^([uv])_final\.norm\.weight$", r"\1_final_layer.norm.weight"),
]


def official_name(name: str) -> str:
    """The official name (without ``net.``) of one of our parameter names."""
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def official_state_dict(model: IMFDiT, prefix: str = PREFIX) -> "OrderedDict[str, torch.Tensor]":
    """The model's parameters under the official names (``prefix`` + name; the released files use "net."),
    the same tensors (detached, not copied). A model without the v-head gives the released files' layout."""
    return OrderedDict((prefix + official_name(name), tensor) for name, tensor in model.state_dict().items())


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if sd and all(k.startswith(PREFIX) for k in sd):
        return {k[len(PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def _few_names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def _block_indices(sd: Mapping[str, torch.Tensor], group: str) -> List[int]:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(rf"^{group}\.(\d+)\.", k)] if m})


def infer_config(state_dict: Mapping[str, torch.Tensor], input_size: int = 32) -> IMFConfig:
    """The IMFConfig of an official state dict (with or without ``net.``), read from its shapes."""
    sd = _strip_prefix(state_dict)
    anchors = ["class_tokens", "omega_tokens", "t_min_tokens", "time_tokens", "x_embedder.proj.weight",
               "y_embedder.embedding_table._flax_embedding.weight", "h_embedder.mlp.0._flax_linear.weight",
               "u_heads.0.attn.q_norm.weight" if "u_heads.0.attn.q_norm.weight" in sd else
               "shared_blocks.0.attn.q_norm.weight", "u_final_layer.linear._flax_linear.weight"]
    missing = [k for k in anchors if k not in sd]
    if missing:
        raise ValueError(f"not an official iMF state dict: missing {_few_names(missing)} (have {len(sd)} keys, "
                         f"e.g. {_few_names(list(sd)[:4])})")
    shape = {k: tuple(sd[k].shape) for k in anchors}
    D = shape["class_tokens"][1]
    conv = shape["x_embedder.proj.weight"]
    head_dim = shape[anchors[7]][0]
    if len(conv) != 4 or conv[0] != D or conv[2] != conv[3] or head_dim < 1 or D % head_dim:
        raise ValueError(f"unknown iMF shapes: x_embedder.proj.weight {conv}, {anchors[7]} ({head_dim},) at "
                         f"width {D}")
    trunk, u_heads, v_heads = (_block_indices(sd, g) for g in ("shared_blocks", "u_heads", "v_heads"))
    if v_heads and v_heads != u_heads:
        raise ValueError(f"the v-head has blocks {v_heads}, the u-head {u_heads}: they must match")
    first = "shared_blocks.0" if trunk else "u_heads.0"
    w1 = sd.get(f"{first}.mlp.w1._flax_linear.weight")
    if w1 is None:
        raise ValueError(f"not an official iMF state dict: missing {first}.mlp.w1._flax_linear.weight")
    mlp_ratio = IMFConfig.mlp_ratio if int(D * IMFConfig.mlp_ratio) == w1.shape[0] else w1.shape[0] / D
    return replace(IMFConfig(), input_size=input_size, patch_size=conv[2], in_channels=conv[1], hidden_size=D,
                   depth=len(trunk) + len(u_heads), head_depth=len(u_heads), num_heads=D // head_dim,
                   mlp_ratio=mlp_ratio, num_classes=shape["y_embedder.embedding_table._flax_embedding.weight"][0] - 1,
                   num_class_tokens=shape["class_tokens"][0], num_omega_tokens=shape["omega_tokens"][0],
                   num_interval_tokens=shape["t_min_tokens"][0], num_time_tokens=shape["time_tokens"][0],
                   freq_dim=shape["h_embedder.mlp.0._flax_linear.weight"][1], v_head=bool(v_heads))


def load_official_imf(path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                      device: Union[str, torch.device] = "cpu", input_size: int = 32) -> IMFDiT:
    """An IMFDiT holding an official checkpoint (a ``.pth`` path or its state dict, keys with or without
    ``net.``), its architecture read from the shapes (``infer_config``), on ``device``, in the checkpoint's
    dtype. Raises ValueError naming the keys or shapes that do not fit."""
    if isinstance(path_or_state_dict, Mapping):
        state_dict = path_or_state_dict
    else:
        if not os.path.isfile(path_or_state_dict):
            raise ValueError(f"path_or_state_dict: no such file {os.fspath(path_or_state_dict)!r}")
        state_dict = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{os.fspath(path_or_state_dict)!r} holds a {type(state_dict).__name__}, not a "
                             "state dict")
    sd = _strip_prefix(state_dict)
    config = infer_config(sd, input_size)
    with torch.device("meta"):
        model = IMFDiT(config)
    expected = {official_name(name): (name, tuple(p.shape)) for name, p in model.state_dict().items()}
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    if missing or unexpected:
        problems = [f"{what} {_few_names(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
                    if keys]
        raise ValueError("official iMF state dict does not match the architecture read from it "
                         f"({_describe_config(config)}): " + "; ".join(problems))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {shape})" for k, (_, shape) in expected.items()
             if tuple(sd[k].shape) != shape]
    if wrong:
        raise ValueError(f"official iMF state dict has wrong shapes for {_describe_config(config)}: "
                         f"{_few_names(wrong)}")
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"official iMF state dict must hold one floating-point dtype, got {sorted(map(str, dtypes))}")
    model.load_state_dict({name: sd[k] for k, (name, _) in expected.items()}, assign=True)
    return model.to(device)


def _describe_config(c: IMFConfig) -> str:
    return (f"width {c.hidden_size}, depth {c.depth} (head {c.head_depth}{', v-head' if c.v_head else ''}), "
            f"{c.num_heads} heads, {c.in_channels} channels, patch {c.patch_size}, {c.num_classes} classes")
