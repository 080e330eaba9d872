"""The official iMF checkpoints' names and shapes (meanflow_fast/imf/official.py): official_state_dict
against the official module's naming rule written out here, round trips, architecture inference for the
four presets, and the loader's errors."""
import pytest
import torch

from meanflow_fast.imf import IMFDiT, imf_dit, load_official_imf, official_state_dict
from tests.helpers import randomize_

# The official imfDiT_{B,M,L,XL}_2 (depth counts the trunk plus one head of 8 blocks), at 32×32×4 latents,
# 1000 classes: (depth, width, heads, SwiGLU hidden = int(width·8/3)).
OFFICIAL = {"B/2": (12, 768, 12, 2048), "M/2": (24, 768, 12, 2048), "L/2": (32, 1024, 16, 2730),
            "XL/2": (48, 1024, 16, 2730)}


def official_keys(depth, width, heads, mlp, v_head, head_depth=8, channels=4, patch=2, classes=1000, freq=256,
                  tokens=(8, 4, 2, 4)):
    """Names and shapes of the official imfDiT's state dict, written from its module tree: the prefix
    token sets, the patch conv ``x_embedder.proj``, four scalar embedders (Linear → SiLU → Linear inside
    ``mlp``, each linear wrapping an ``nn.Linear`` as ``_flax_linear``), the label table (classes + 1 rows,
    ``_flax_embedding``), the blocks ``shared_blocks`` / ``u_heads`` / ``v_heads`` (gates ``attn_scale``,
    ``mlp_scale``; RMSNorms ``norm1``, ``norm2``, ``attn.q_norm``, ``attn.k_norm``; bias-free
    projections), and two final layers."""
    n_class, n_omega, n_interval, n_time = tokens
    D, out = width, patch * patch * channels
    keys = {"time_tokens": (n_time, D), "class_tokens": (n_class, D), "omega_tokens": (n_omega, D),
            "t_min_tokens": (n_interval, D), "t_max_tokens": (n_interval, D),
            "x_embedder.proj.weight": (D, channels, patch, patch), "x_embedder.proj.bias": (D,),
            "y_embedder.embedding_table._flax_embedding.weight": (classes + 1, D)}
    for emb in ("h_embedder", "omega_embedder", "cfg_t_start_embedder", "cfg_t_end_embedder"):
        keys.update({f"{emb}.mlp.0._flax_linear.weight": (D, freq), f"{emb}.mlp.0._flax_linear.bias": (D,),
                     f"{emb}.mlp.2._flax_linear.weight": (D, D), f"{emb}.mlp.2._flax_linear.bias": (D,)})
    groups = [("shared_blocks", depth - head_depth), ("u_heads", head_depth)]
    groups += [("v_heads", head_depth)] if v_head else []
    for group, n in groups:
        for i in range(n):
            b = f"{group}.{i}."
            keys.update({b + "attn_scale": (D,), b + "mlp_scale": (D,), b + "norm1.weight": (D,),
                         b + "norm2.weight": (D,), b + "attn.q_norm.weight": (D // heads,),
                         b + "attn.k_norm.weight": (D // heads,), b + "mlp.w1._flax_linear.weight": (mlp, D),
                         b + "mlp.w3._flax_linear.weight": (mlp, D), b + "mlp.w2._flax_linear.weight": (D, mlp)})
            keys.update({b + f"attn.{p}_proj._flax_linear.weight": (D, D) for p in ("q", "k", "v", "out")})
    for head in ("u", "v"):
        final = f"{head}_final_layer."
        keys.update({final + "norm.weight": (D,), final + "linear._flax_linear.weight": (out, D),
                     final + "linear._flax_linear.bias": (out,)})
    return keys


def _meta_model(preset, v_head):
    with torch.device("meta"):
        return imf_dit(preset, v_head=v_head)


@pytest.mark.parametrize("v_head", [True, False])
@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_official_state_dict_names_and_shapes(preset, v_head):
    expect = official_keys(*OFFICIAL[preset], v_head=v_head)
    got = official_state_dict(_meta_model(preset, v_head))
    assert set(got) == {"net." + k for k in expect}
    assert {k: tuple(v.shape) for k, v in got.items()} == {"net." + k: s for k, s in expect.items()}
    if preset == "B/2" and not v_head:
        assert len(got) == 186  # the official inference module's state dict
    bare = official_state_dict(_meta_model(preset, v_head), prefix="")
    assert set(bare) == set(expect)


def _official_random(preset="tiny", v_head=True, **kw):
    """A random state dict under the official names, built from the transcription above."""
    if preset == "tiny":
        keys = official_keys(3, 64, 2, 170, v_head, head_depth=1, classes=10, freq=32, **kw)
    else:
        keys = official_keys(*OFFICIAL[preset], v_head=v_head, **kw)
    return {"net." + k: torch.randn(s) for k, s in keys.items()}


@pytest.mark.parametrize("v_head", [True, False])
@pytest.mark.parametrize("prefix", ["net.", ""])
def test_round_trip_official_ours_official(v_head, prefix):
    sd = {k[4:] if not prefix else k: v for k, v in _official_random(v_head=v_head).items()}
    model = load_official_imf(sd, input_size=8)
    assert model.config == imf_dit("tiny", v_head=v_head).config
    back = official_state_dict(model, prefix=prefix)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_round_trip_ours_official_ours_keeps_the_outputs(tmp_path):
    model = randomize_(imf_dit("tiny"), std=0.15)
    path = tmp_path / "iMF-tiny.pth"
    torch.save(official_state_dict(model), path)
    loaded = load_official_imf(path, input_size=8)
    assert loaded.config == model.config and isinstance(loaded, IMFDiT)
    z, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 10])
    args = (z, torch.tensor([1.0, 0.7]), torch.tensor([1.0, 0.2]), 4.0, 0.3, 0.6, y)
    for a, b in zip(model(*args), loaded(*args)):
        assert torch.equal(a, b)
    assert loaded.x_embedder.weight.device.type == "cpu"


@pytest.mark.parametrize("v_head", [True, False])
@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_architecture_read_from_the_shapes(preset, v_head):
    keys = official_keys(*OFFICIAL[preset], v_head=v_head)
    sd = {"net." + k: torch.empty(s, device="meta") for k, s in keys.items()}
    model = load_official_imf(sd, device="meta")
    assert model.config == _meta_model(preset, v_head).config
    assert model.x_embedder.weight.is_meta


def test_architecture_other_than_the_presets():
    """Channels, patch, classes, width, heads, depths and token counts all come from the shapes."""
    keys = official_keys(5, 96, 3, 256, True, head_depth=2, channels=3, patch=4, classes=17, freq=64,
                         tokens=(3, 2, 1, 5))
    model = load_official_imf({k: torch.empty(s, device="meta") for k, s in keys.items()}, device="meta",
                              input_size=16)
    c = model.config
    assert (c.in_channels, c.patch_size, c.num_classes, c.hidden_size, c.num_heads, c.depth, c.head_depth) == \
        (3, 4, 17, 96, 3, 5, 2)
    assert (c.num_class_tokens, c.num_omega_tokens, c.num_interval_tokens, c.num_time_tokens, c.freq_dim) == \
        (3, 2, 1, 5, 64)
    assert c.mlp_hidden == 256 and c.input_size == 16


def test_loader_errors(tmp_path):
    sd = _official_random()
    truncated = {k: v for k, v in sd.items() if not k.startswith("net.u_heads.0.mlp")}
    with pytest.raises(ValueError, match=r"missing net\.|missing u_heads\.0\.mlp\.w"):
        load_official_imf(truncated, input_size=8)
    wrong = dict(sd, **{"net.shared_blocks.1.attn.k_proj._flax_linear.weight": torch.randn(64, 65)})
    with pytest.raises(ValueError, match=r"wrong shapes .*shared_blocks\.1\.attn\.k_proj\._flax_linear\.weight "
                                         r"\(64, 65\) \(expected \(64, 64\)\)"):
        load_official_imf(wrong, input_size=8)
    extra = dict(sd, **{"net.u_heads.0.attn.bias": torch.randn(64)})
    with pytest.raises(ValueError, match=r"unexpected u_heads\.0\.attn\.bias"):
        load_official_imf(extra, input_size=8)
    extra_block = dict(sd, **{"net.v_heads.1.attn_scale": torch.randn(64)})
    with pytest.raises(ValueError, match="the v-head has blocks"):
        load_official_imf(extra_block, input_size=8)
    with pytest.raises(ValueError, match="not an official iMF state dict: missing"):
        load_official_imf({"blocks.0.weight": torch.randn(3)})
    half = {k: (v.half() if "mlp_scale" in k else v) for k, v in sd.items()}
    with pytest.raises(ValueError, match="one floating-point dtype"):
        load_official_imf(half, input_size=8)
    with pytest.raises(ValueError, match="no such file"):
        load_official_imf(tmp_path / "missing.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_official_imf(tmp_path / "list.pth")


def test_official_names_land_on_the_right_parameters():
    """Each official tensor ends in the parameter that plays its role in the official forward: the
    interval start/end embedders embed t_min/t_max, the SwiGLU's silu branch is w1 and its linear branch
    w3, the scales gate the residuals, shared_blocks is the trunk."""
    sd = _official_random()
    model = load_official_imf(sd, input_size=8)
    pairs = {"cfg_t_start_embedder.mlp.0._flax_linear.weight": model.t_min_embedder.mlp[0].weight,
             "cfg_t_end_embedder.mlp.2._flax_linear.bias": model.t_max_embedder.mlp[2].bias,
             "omega_embedder.mlp.0._flax_linear.weight": model.omega_embedder.mlp[0].weight,
             "h_embedder.mlp.2._flax_linear.weight": model.h_embedder.mlp[2].weight,
             "shared_blocks.1.mlp.w1._flax_linear.weight": model.trunk[1].mlp.w1.weight,
             "shared_blocks.1.mlp.w3._flax_linear.weight": model.trunk[1].mlp.w3.weight,
             "u_heads.0.attn_scale": model.u_blocks[0].attn_gate, "v_heads.0.mlp_scale": model.v_blocks[0].mlp_gate,
             "u_heads.0.attn.out_proj._flax_linear.weight": model.u_blocks[0].attn.out_proj.weight,
             "shared_blocks.0.attn.k_norm.weight": model.trunk[0].attn.k_norm.weight,
             "v_final_layer.linear._flax_linear.bias": model.v_final.linear.bias,
             "u_final_layer.norm.weight": model.u_final.norm.weight,
             "x_embedder.proj.weight": model.x_embedder.weight}
    for name, param in pairs.items():
        assert torch.equal(sd["net." + name], param), name


def test_save_model_and_load_model_keep_an_imf_model(tmp_path):
    """A loaded official checkpoint kept in the package's weights format comes back equal."""
    from meanflow_fast.weights import load_model, read_model_info, save_model
    model = load_official_imf(_official_random(v_head=False), input_size=8)
    path = str(tmp_path / "imf.safetensors")
    save_model(model, path, space="latents", preset="tiny")
    info = read_model_info(path)
    assert info.architecture == "IMFDiT" and info.config == model.config and not info.config.v_head
    loaded = load_model(path)
    assert isinstance(loaded, IMFDiT) and loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
