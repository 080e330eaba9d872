"""One weights format and one loader (meanflow_fast.weights): save_model → load_model round trips, the
metadata on disk, every error, the umask, training checkpoints through the same loader, the trainer's
ema.safetensors, and meanflow-sample from a pixel-space model file without --vae."""
import json
import os
import re
import shlex
import signal
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from meanflow_fast import load_model, meanflow_dit, sample, save_model
from meanflow_fast.imagenet import sample as sample_cmd
from meanflow_fast.imagenet.checkpoint import load_checkpoint, prefixed, save_checkpoint
from meanflow_fast.io import TMP_PREFIX, remove_stale_tmp
from meanflow_fast.weights import ARCHITECTURES, read_model_info, register_architecture
from tests.helpers import randomize_, run_killed_past

# An odd configuration, typed by hand: every field differs from DiTConfig's default.
ODD_CONFIG = {"input_size": 6, "patch_size": 3, "in_channels": 3, "hidden_size": 36, "depth": 3, "num_heads": 3,
              "mlp_ratio": 2.5, "num_classes": 7, "freq_dim": 18, "max_period": 333.0}


def odd_model(std=0.2):
    return randomize_(meanflow_dit("tiny", **ODD_CONFIG), std=std)


def outputs(model, seed=0, batch=5):
    c = model.config
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    r = t * torch.rand(batch, generator=g)
    y = torch.randint(0, c.num_classes + 1, (batch,), generator=g)
    with torch.no_grad():
        return model(z, r, t, y)


def metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# =================================================================================================
#                                    Round trip and metadata
# =================================================================================================
def test_round_trip_gives_the_same_network(tmp_path):
    model = odd_model()
    path = tmp_path / "m.safetensors"
    save_model(model, str(path), space="pixels", pixel_range=(-2, 3), weights="model", step=1234, preset="tiny")
    loaded = load_model(str(path))
    assert type(loaded) is type(model) and asdict(loaded.config) == ODD_CONFIG
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(outputs(loaded, seed=3), outputs(model.eval(), seed=3))
    # torch.device or str both work for device.
    assert next(load_model(path, device=torch.device("cpu")).parameters()).device.type == "cpu"


def test_metadata_on_disk(tmp_path):
    model = odd_model()
    path = tmp_path / "m.safetensors"
    save_model(model, str(path), space="pixels", pixel_range=(-2, 3), weights="model", step=1234, preset="tiny")
    meta = metadata(path)
    assert set(meta) == {"format", "architecture", "config", "space", "pixel_range", "weights", "step", "preset"}
    assert meta["format"] == "meanflow-fast/model-v1" and meta["architecture"] == "MeanFlowDiT"
    assert json.loads(meta["config"]) == ODD_CONFIG
    assert meta["space"] == "pixels" and json.loads(meta["pixel_range"]) == [-2.0, 3.0]
    assert (meta["weights"], meta["step"], meta["preset"]) == ("model", "1234", "tiny")
    tensors = load_file(str(path))
    assert set(tensors) == set(model.state_dict())
    info = read_model_info(str(path))
    assert (info.kind, info.space, info.pixel_range, info.weights, info.step, info.preset) == \
        ("model", "pixels", (-2.0, 3.0), "model", 1234, "tiny")
    # Defaults: latents, no pixel range, nothing optional recorded.
    save_model(model, str(tmp_path / "l.safetensors"))
    meta = metadata(tmp_path / "l.safetensors")
    assert set(meta) == {"format", "architecture", "config", "space"} and meta["space"] == "latents"
    # Pixels without a range: [-1, 1].
    save_model(model, str(tmp_path / "p.safetensors"), space="pixels")
    assert json.loads(metadata(tmp_path / "p.safetensors")["pixel_range"]) == [-1.0, 1.0]


@pytest.mark.parametrize("umask,mode", [(0o077, 0o600), (0o027, 0o640), (0o002, 0o664)])
def test_file_mode_follows_the_umask(umask, mode, tmp_path):
    model = meanflow_dit("tiny", depth=1)
    path = tmp_path / "m.safetensors"
    old = os.umask(umask)
    try:
        save_model(model, str(path))
        new = stat.S_IMODE(os.stat(path).st_mode)
        save_model(model, str(path), step=2)  # replacing it
        replaced = stat.S_IMODE(os.stat(path).st_mode)
    finally:
        os.umask(old)
    assert (oct(new), oct(replaced)) == (oct(mode), oct(mode))
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp file left


def test_save_model_killed_mid_write_leaves_the_old_file_and_only_a_tmp_file_we_clean(tmp_path):
    """A process killed in the middle of save_model's write (SIGXFSZ past a file-size limit): the file it
    was replacing is intact, and what the write left is one ``.tmp-*`` file, cut at the limit, which
    remove_stale_tmp removes: no temp file of another naming (safetensors' save_file writes through a
    ``.tmpXXXXXX`` of its own) that nothing would ever clean."""
    path = tmp_path / "m.safetensors"
    model = odd_model()
    save_model(model, str(path), step=1)
    old = path.read_bytes()
    limit = len(old) // 3
    proc = run_killed_past(limit, "import sys\nfrom tests.test_weights import odd_model, save_model\nm = odd_model()",
                           "save_model(m, sys.argv[1], step=2)", str(path))
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    assert path.read_bytes() == old
    left = sorted(set(os.listdir(tmp_path)) - {"m.safetensors"})
    assert len(left) == 1 and left[0].startswith(TMP_PREFIX + "m.safetensors."), left
    assert os.path.getsize(tmp_path / left[0]) == limit  # killed in the middle of writing it
    assert remove_stale_tmp(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert torch.equal(outputs(load_model(str(path))), outputs(model.eval()))


# =================================================================================================
#                                         save_model errors
# =================================================================================================
SAVE_ERRORS = [
    (dict(path="m.pt"), "ending in .safetensors"),
    (dict(space="rgb"), "space must be one of"),
    (dict(pixel_range=(-1, 1)), "pixel_range is for space='pixels' only"),
    (dict(space="pixels", pixel_range=(1, 1)), "lo < hi"),
    (dict(space="pixels", pixel_range=(0, float("nan"))), "lo < hi"),
    (dict(space="pixels", pixel_range="ab"), "two numbers"),
    (dict(weights="best"), "weights must be one of"),
    (dict(step=-1), "step must be an int ≥ 0"),
    (dict(step=True), "step must be an int ≥ 0"),
    (dict(preset=""), "preset must be a non-empty str"),
]


@pytest.mark.parametrize("kwargs,match", SAVE_ERRORS, ids=[m for _, m in SAVE_ERRORS])
def test_save_model_rejects_bad_arguments(kwargs, match, tmp_path):
    kwargs = dict(kwargs)
    path = str(tmp_path / kwargs.pop("path", "m.safetensors"))
    with pytest.raises(ValueError, match=match):
        save_model(meanflow_dit("tiny", depth=1), path, **kwargs)
    assert os.listdir(tmp_path) == []


def test_save_model_rejects_an_unregistered_network(tmp_path):
    with pytest.raises(ValueError, match="registered architecture .*MeanFlowDiT.*got Linear"):
        save_model(nn.Linear(2, 2), str(tmp_path / "m.safetensors"))
    assert os.listdir(tmp_path) == []


# =================================================================================================
#                                         load_model errors
# =================================================================================================
def good_file(tmp_path):
    model = odd_model()
    path = tmp_path / "good.safetensors"
    save_model(model, str(path), space="pixels", weights="ema", step=5, preset="tiny")
    return path, metadata(path), load_file(str(path))


def _with(meta, **changes):
    meta = dict(meta)
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    return meta


def _config(**changes):
    cfg = dict(ODD_CONFIG)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    return json.dumps(cfg)


WHERE = "save_model.*meanflow-demo.*meanflow-train"
META_ERRORS = {
    "no metadata": (lambda m: None, f"without meanflow-fast model metadata \\(missing 'format', 'architecture', "
                                    f"'config', 'space'\\); .*{WHERE}"),
    "older demo file": (lambda m: {"config": m["config"], "preset": "digits"},
                        f"missing 'format', 'architecture', 'space'\\); .*{WHERE}"),
    "newer format": (lambda m: _with(m, format="meanflow-fast/model-v2"),
                     "format 'meanflow-fast/model-v2', which this version of meanflow-fast cannot read .*model-v1"),
    "other format": (lambda m: _with(m, format="pt"), f"not a meanflow-fast model file \\(format 'pt'.*{WHERE}"),
    "unknown architecture": (lambda m: _with(m, architecture="NoSuchNet"),
                             "unknown architecture 'NoSuchNet' \\(known: (\\w+, )*MeanFlowDiT\\b.*register_architecture"),
    "config: unknown field": (lambda m: _with(m, config=_config(depthh=3)), "unknown field\\(s\\) \\['depthh'\\]"),
    "config: missing field": (lambda m: _with(m, config=_config(depth=None)), "missing field\\(s\\) \\['depth'\\]"),
    "config: wrong type": (lambda m: _with(m, config=_config(depth="3")), "config field 'depth' must be int, got '3'"),
    "config: bool for int": (lambda m: _with(m, config=_config(depth=True)), "config field 'depth' must be int"),
    "config: not JSON": (lambda m: _with(m, config="{depth: 3"), "config metadata is not valid JSON"),
    "config: not an object": (lambda m: _with(m, config="[1, 2]"), "config must be a JSON object, got list"),
    "space": (lambda m: _with(m, space="rgb"), "space must be one of \\('latents', 'pixels'\\), got 'rgb'"),
    "pixels without range": (lambda m: _with(m, pixel_range=None), "needs 'pixel_range'"),
    "pixel range reversed": (lambda m: _with(m, pixel_range="[1, -1]"), "pixel_range must be two finite numbers lo < hi"),
    "weights": (lambda m: _with(m, weights="best"), "weights must be one of \\('ema', 'model'\\), got 'best'"),
    "step": (lambda m: _with(m, step="-3"), "step must be an integer ≥ 0, got '-3'"),
}


@pytest.mark.parametrize("case", list(META_ERRORS))
def test_load_model_rejects_bad_metadata(case, tmp_path):
    _, meta, tensors = good_file(tmp_path)
    change, match = META_ERRORS[case]
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=change(meta))
    with pytest.raises(ValueError, match=match) as e:
        load_model(str(bad))
    assert str(bad) in str(e.value)
    with pytest.raises(ValueError, match=match):
        read_model_info(str(bad))


def test_load_model_rejects_a_config_that_builds_no_model(tmp_path):
    _, meta, tensors = good_file(tmp_path)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=_with(meta, config=_config(input_size=7)))  # 7 is not a multiple of 3
    with pytest.raises(ValueError, match="does not build a MeanFlowDiT .*divisible by patch_size"):
        load_model(str(bad))


def _drop(sd, keys):
    return {k: v for k, v in sd.items() if k not in keys}


STATE_ERRORS = {
    "missing": (lambda sd: _drop(sd, {"final_layer.linear.bias"}), "1 missing tensor\\(s\\): final_layer.linear.bias$"),
    "many missing": (lambda sd: _drop(sd, {k for k in sd if k.startswith("blocks.2.")}),
                     "10 missing tensor\\(s\\): blocks.2.\\S+, blocks.2.\\S+, blocks.2.\\S+, blocks.2.\\S+ and 6 more$"),
    "unexpected": (lambda sd: {**sd, "extra.weight": torch.zeros(2)}, "1 unexpected tensor\\(s\\): extra.weight$"),
    # 7 classes + the null label: 8 rows of width 36.
    "shape": (lambda sd: {**sd, "y_embedder.embedding_table.weight": torch.zeros(9, 36)},
              "1 tensor\\(s\\) of the wrong shape: y_embedder.embedding_table.weight \\(9, 36\\) \\(expected \\(8, 36\\)\\)"),
}


@pytest.mark.parametrize("case", list(STATE_ERRORS))
def test_load_model_rejects_weights_that_do_not_fit(case, tmp_path):
    _, meta, tensors = good_file(tmp_path)
    change, match = STATE_ERRORS[case]
    bad = tmp_path / "bad.safetensors"
    save_file(change(tensors), str(bad), metadata=meta)
    with pytest.raises(ValueError, match=f"weights do not fit the MeanFlowDiT its config describes: {match}"):
        load_model(str(bad))


def test_load_model_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="model file or checkpoint not found: .*nope.safetensors"):
        load_model(str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=f"junk.safetensors is not a readable safetensors file .*{WHERE}"):
        load_model(str(tmp_path / "junk.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(str(tmp_path / "m.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint found in"):
        load_model(str(tmp_path / "empty"))
    path, _, _ = good_file(tmp_path)
    with pytest.raises(ValueError, match="weights must be one of \\('ema', 'model'\\), got 'best'"):
        load_model(str(path), weights="best")


# =================================================================================================
#                                     Another architecture
# =================================================================================================
@dataclass(frozen=True)
class _ToyConfig:
    width: int = 3
    scale: float = 1.0


class _Toy(nn.Module):
    def __init__(self, config: _ToyConfig):
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.width, config.width)


def test_a_registered_architecture_saves_and_loads(tmp_path):
    with pytest.raises(ValueError, match="'MeanFlowDiT' is registered already"):
        register_architecture("MeanFlowDiT", _ToyConfig, _Toy)
    register_architecture("Toy", _ToyConfig, _Toy)
    try:
        toy = _Toy(_ToyConfig(width=5, scale=0.5))
        save_model(toy, str(tmp_path / "toy.safetensors"))
        assert metadata(tmp_path / "toy.safetensors")["architecture"] == "Toy"
        loaded = load_model(str(tmp_path / "toy.safetensors"))
        assert isinstance(loaded, _Toy) and loaded.config == _ToyConfig(width=5, scale=0.5)
        assert torch.equal(loaded.lin.weight, toy.lin.weight)
    finally:
        del ARCHITECTURES["Toy"]


# =================================================================================================
#                              Training checkpoints through load_model
# =================================================================================================
def _tiny_checkpoints(ckpt_dir):
    """Checkpoints at steps 3 and 7 of a tiny model, model and EMA weights all different; returns
    {step: (model, ema)}."""
    out = {}
    for step in (3, 7):
        model = randomize_(meanflow_dit("tiny", input_size=4, in_channels=2, depth=1, hidden_size=32, num_heads=2,
                                        num_classes=3, freq_dim=16))
        ema = randomize_(meanflow_dit("tiny", input_size=4, in_channels=2, depth=1, hidden_size=32, num_heads=2,
                                      num_classes=3, freq_dim=16))
        state = {"model_config": asdict(model.config), "args": {"preset": "tiny"}, "epoch": 0, "epoch_pos": step}
        save_checkpoint(str(ckpt_dir), step, model=model, ema_model=ema, optimizer=torch.optim.Adam(model.parameters()),
                        state=state, rng_tensors=[], rng_json=[])
        out[step] = (model, ema)
    return out


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_reads_training_checkpoints(tmp_path):
    run = tmp_path / "run"
    nets = _tiny_checkpoints(run / "checkpoints")
    ckpts = run / "checkpoints"
    for spec in (run, ckpts, ckpts / "0000007.json", ckpts / "0000007.safetensors"):
        ema = load_model(str(spec))
        assert _same_weights(ema, nets[7][1]) and not _same_weights(ema, nets[7][0])
        assert not ema.training and not any(p.requires_grad for p in ema.parameters())
        assert _same_weights(load_model(str(spec), weights="model"), nets[7][0])
    assert _same_weights(load_model(str(ckpts / "0000003.json")), nets[3][1])
    info = read_model_info(str(run))
    assert (info.kind, info.path, info.space, info.step, info.preset, info.weights) == \
        ("checkpoint", str(ckpts / "0000007.json"), "latents", 7, "tiny", None)
    # A checkpoint whose model_config does not fit: named like a model file's.
    meta = json.loads((ckpts / "0000003.json").read_text())
    meta["model_config"]["heads"] = 2
    (ckpts / "0000003.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="0000003.json: config does not match DiTConfig: unknown field\\(s\\) \\['heads'\\]"):
        load_model(str(ckpts / "0000003.json"))


def test_trainer_exports_ema_weights_at_every_checkpoint(tmp_path, monkeypatch):
    from meanflow_fast.imagenet import train
    from tests.test_reliability import TRAIN_ARGS, make_shards
    shards = make_shards(tmp_path / "shards")
    results = tmp_path / "run"
    exported = []
    real_save_model = train.save_model

    def spy(model, path, **info):
        real_save_model(model, path, **info)
        exported.append((os.path.relpath(path, results), info["step"]))
    monkeypatch.setattr(train, "save_model", spy)
    train.cli(["--data-path", shards, "--results-dir", str(results), *TRAIN_ARGS, "--max-steps", "3",
               "--ckpt-every", "2"])
    assert exported == [("ema.safetensors", 2), ("ema.safetensors", 3)]
    meta = metadata(results / "ema.safetensors")
    assert (meta["space"], meta["weights"], meta["step"], meta["preset"]) == ("latents", "ema", "3", "tiny")
    _, tensors = load_checkpoint(str(results / "checkpoints" / "0000003.json"))
    ema_ckpt, exported_tensors = prefixed(tensors, "ema"), load_file(str(results / "ema.safetensors"))
    assert set(exported_tensors) == set(ema_ckpt)
    assert all(torch.equal(exported_tensors[k], ema_ckpt[k]) for k in ema_ckpt)
    assert _same_weights(load_model(str(results / "ema.safetensors")), load_model(str(results)))
    assert not [p for p in os.listdir(results) if p.startswith(".tmp-")]


# =================================================================================================
#                                meanflow-sample with a model file
# =================================================================================================
def _no_work(args):
    raise AssertionError("main() ran although the arguments are bad")


def test_sample_from_a_pixel_model_file_without_vae(tmp_path):
    model = randomize_(meanflow_dit("digits", depth=2), std=0.05)
    path = tmp_path / "digits.safetensors"
    save_model(model, str(path), space="pixels", weights="ema", preset="digits")
    out = tmp_path / "digits.npz"
    n, seed = 23, 5
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same CPU GEMM blocking in the command and the reference below
    try:
        sample_cmd.cli(["--ckpt", str(path), "--num-samples", str(n), "--batch-size", str(n), "--seed", str(seed),
                        "--out", str(out), "--device", "cpu"])
        # Reference: the loaded model sampled directly from the documented noise, sample i's generator
        # seeded with seed · 1,000,003 + i.
        loaded = load_model(str(path))
        noise = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                             for i in range(n)])
        y = torch.arange(n) % 10
        x = sample(loaded, y, noise=noise)[:, 0].double().numpy()
    finally:
        torch.set_num_threads(threads)
    with np.load(out) as d:
        arr, labels = d["arr_0"], d["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (n, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(n)]
    # [-1, 1] → [0, 255], clamped, rounded to the nearest integer (a tie may go either way).
    v = (np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * 255.0
    want = np.floor(v + 0.5)
    tie = np.abs(v - np.floor(v) - 0.5) < 1e-3
    for c in range(3):
        diff = np.abs(arr[..., c].astype(np.float64) - want)
        assert diff.max() <= 1 and (diff[~tie] == 0).all()
    assert (arr == 0).any() and (arr == 255).any() and ((arr > 0) & (arr < 255)).mean() > 0.3  # all three cases


def test_sample_from_a_latent_model_file_equals_its_checkpoint(tmp_path):
    """A latent-space model file with --vae samples what its training checkpoint samples."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)  # 32 px ↔ 4×8×8 latents
    vae.save_pretrained(str(tmp_path / "vae"))
    model = randomize_(meanflow_dit("tiny", depth=1), std=0.05)
    ema = randomize_(meanflow_dit("tiny", depth=1), std=0.05)
    run = tmp_path / "run"
    save_checkpoint(str(run / "checkpoints"), 4, model=model, ema_model=ema,
                    optimizer=torch.optim.Adam(model.parameters()), state={"model_config": asdict(model.config)},
                    rng_tensors=[], rng_json=[])
    save_model(ema, str(run / "ema.safetensors"), weights="ema", step=4)
    common = ["--vae", str(tmp_path / "vae"), "--num-samples", "5", "--device", "cpu"]
    sample_cmd.cli(["--ckpt", str(run), "--out", str(tmp_path / "a.npz"), *common])
    sample_cmd.cli(["--ckpt", str(run / "ema.safetensors"), "--out", str(tmp_path / "b.npz"), *common])
    sample_cmd.cli(["--ckpt", str(run), "--weights", "model", "--out", str(tmp_path / "c.npz"), *common])
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b, np.load(tmp_path / "c.npz") as c:
        assert a["arr_0"].shape == (5, 32, 32, 3) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        assert not np.array_equal(a["arr_0"], c["arr_0"])  # --weights model: the raw weights


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_load_and_sample_recipe_on_the_demo_model_file(tmp_path, monkeypatch):
    """README's "Load and sample" blocks run as written, on the file a (short) meanflow-demo writes."""
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install -e '.[dev]')")
    from meanflow_fast import demo
    monkeypatch.chdir(tmp_path)
    demo.cli(["--preset", "tiny", "--steps", "2", "--batch-size", "8", "--samples-per-class", "10",
              "--classifier-steps", "1", "--out", "demo_out", "--quiet"])
    path = tmp_path / "demo_out" / "meanflow_digits.safetensors"
    info = read_model_info(str(path))
    assert (info.space, info.pixel_range, info.weights, info.preset) == ("pixels", (-1.0, 1.0), "ema", "tiny")
    assert (info.config.in_channels, info.config.input_size, info.config.num_classes) == (1, 8, 10)

    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Load and sample"):]
    section = section[: section.index("\n## ")]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    bash = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(python) == 1 and len(bash) == 1, section
    scope = {}
    exec(compile(python[0], "README.md (Load and sample)", "exec"), scope)
    assert scope["digits"].shape == (10, 1, 8, 8)
    assert _same_weights(load_model("digits.safetensors"), load_model(str(path)))
    commands = [line for line in bash[0].splitlines() if line and not line.startswith("#")]
    assert [c.split()[0] for c in commands] == ["meanflow-sample"], commands
    sample_cmd.cli(shlex.split(commands[0])[1:])
    with np.load(tmp_path / "digits.npz") as d:
        assert d["arr_0"].dtype == np.uint8 and d["arr_0"].shape == (100, 8, 8, 3)
        assert d["arr_1"].tolist() == [i % 10 for i in range(100)]
        assert (d["arr_0"][..., 0] == d["arr_0"][..., 2]).all()  # grey


def _latent_file(tmp_path):
    path = tmp_path / "latent.safetensors"
    save_model(meanflow_dit("tiny", depth=1), str(path), weights="ema")
    return path


def _pixel_file(tmp_path, channels=1):
    path = tmp_path / f"pixels{channels}.safetensors"
    save_model(meanflow_dit("digits", depth=1, in_channels=channels), str(path), space="pixels")
    return path


def _plain_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(meanflow_dit("tiny", depth=1).state_dict(), str(path))
    return path


def _checkpoint_run(tmp_path):
    _tiny_checkpoints(tmp_path / "run" / "checkpoints")
    return tmp_path / "run"


SAMPLE_ERRORS = {
    "latent model, no --vae": (_latent_file, [], "--vae is required: --ckpt .*latent.safetensors is a latent-space model"),
    "checkpoint, no --vae": (_checkpoint_run, [], "--vae is required: --ckpt .*run is a latent-space model"),
    "pixel model with --vae": (_pixel_file, ["--vae", "stabilityai/sd-vae-ft-ema"],
                               "--vae stabilityai/sd-vae-ft-ema: --ckpt .*pixels1.safetensors is a pixel-space model, "
                               "whose samples are images already; leave out --vae"),
    "2-channel pixel model": (lambda p: _pixel_file(p, 2), [], "a pixel-space model with 2 channels cannot be written"),
    "--weights with a model file": (_pixel_file, ["--weights", "ema"],
                                    "--weights ema: --weights picks the weights of a training checkpoint, but --ckpt "
                                    ".*pixels1.safetensors is a model file"),
    "plain safetensors": (_plain_file, [], "--ckpt: .*plain.safetensors is a safetensors file without meanflow-fast "
                                           "model metadata \\(missing 'format'"),
    "missing file": (lambda p: p / "gone.safetensors", [], "--ckpt: model file or checkpoint not found"),
}


@pytest.mark.parametrize("case", list(SAMPLE_ERRORS))
def test_sample_usage_errors_before_any_work(case, tmp_path, monkeypatch, capsys):
    make, extra, match = SAMPLE_ERRORS[case]
    ckpt = make(tmp_path)
    monkeypatch.setattr(sample_cmd, "main", _no_work)
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "new" / "s.npz"
    with pytest.raises(SystemExit) as e:
        sample_cmd.cli(["--ckpt", str(ckpt), "--out", str(out), "--num-samples", "2", "--device", "cpu", *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "meanflow-sample: error: " in err
    assert re.search(match, " ".join(err.split())), err
    assert sorted(os.listdir(tmp_path)) == before  # nothing created
