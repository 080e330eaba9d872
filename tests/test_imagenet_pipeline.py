"""ImageNet pipeline on CPU, end to end at toy size: ImageFolder → extract (2 ranks) → DDP train (2 ranks,
gloo) → resume → sample (2 ranks) → FID; the preset table against docs/DESIGN.md; DDP gradient sync through
forward_jvp."""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from meanflow_fast.imagenet.checkpoint import list_checkpoints, load_checkpoint, prefixed  # noqa: E402
from meanflow_fast.imagenet.config import LATENT_SCALE, PAPER_PRESETS, TRAIN_PRESETS  # noqa: E402
from meanflow_fast.imagenet.data import LatentShards, center_crop_arr, read_shard_meta  # noqa: E402
from meanflow_fast.model import PRESETS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CLASSES, PER_CLASS, IMAGE_SIZE = 3, 8, 32


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return env


def run(args, nproc=None, timeout=240):
    """Run ``python -m <module> args`` (under torchrun with ``nproc`` CPU processes); return stdout+stderr."""
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    p = subprocess.run(cmd + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(args[:2])} failed ({p.returncode}):\n{out[-4000:]}"
    return out


def console_script(name, args):
    """Run the console script ``name`` as pip's wrapper does (``sys.exit(<entry point>())``), its entry
    point read from setup.py, which is what gets installed; return the CompletedProcess."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = re.search(rf'"{name}=([\w.]+):(\w+)"', f.read())
    assert m, f"no console script {name} in setup.py"
    code = f"import sys; from {m[1]} import {m[2]}; sys.argv[0] = {name!r}; sys.exit({m[2]}())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=240)


# =================================================================================================
#                                         Presets
# =================================================================================================
# docs/DESIGN.md, "1 The MeanFlow objective", typed by hand: depth, width, heads, ω, κ, guidance interval.
DESIGN_TABLE = {
    "B/2": (12, 768, 12, 1.0, 0.5, (0.0, 1.0)),
    "M/2": (16, 1024, 16, 1.0, 0.5, (0.0, 1.0)),
    "L/2": (24, 1024, 16, 0.2, 0.92, (0.0, 0.8)),
    "XL/2": (28, 1152, 16, 0.2, 0.92, (0.0, 0.75)),
}


@pytest.mark.parametrize("preset", ["B/2", "M/2", "L/2", "XL/2"])
def test_preset_defaults_match_design_table(preset):
    depth, width, heads, omega, kappa, interval = DESIGN_TABLE[preset]
    p = TRAIN_PRESETS[preset]
    assert (p["depth"], p["hidden_size"], p["num_heads"]) == (depth, width, heads)
    assert (p["omega"], p["kappa"], tuple(p["guidance_interval"])) == (omega, kappa, interval)
    # Common to every preset (the text under that table).
    assert p["global_batch_size"] == 256 and p["lr"] == 1e-4 and tuple(p["adam_betas"]) == (0.9, 0.95)
    assert p["ema_decay"] == 0.9999 and p["epochs"] == 240 and p["weight_decay"] == 0.0
    assert p["class_dropout"] == 0.1 and p["time_mu"] == -0.4 and p["time_sigma"] == 1.0
    assert p["ratio_r_neq_t"] == 0.25 and p["adaptive_p"] == 1.0 and p["adaptive_c"] == 0.01
    # The model registry agrees on the architecture.
    m = PRESETS[preset]
    assert (m["depth"], m["hidden_size"], m["num_heads"]) == (depth, width, heads)
    assert set(PAPER_PRESETS) == set(DESIGN_TABLE) and LATENT_SCALE == 0.18215


def test_train_cli_fills_preset_defaults(tmp_path):
    from meanflow_fast.imagenet.train import build_parser, fill_defaults
    args = build_parser().parse_args(["--data-path", str(tmp_path), "--results-dir", str(tmp_path / "r"),
                                      "--preset", "XL/2", "--kappa", "0.5"])
    fill_defaults(args)
    assert args.depth == 28 and args.omega == 0.2 and args.kappa == 0.5 and args.guidance_interval == [0.0, 0.75]
    assert args.global_batch_size == 256 and args.adam_betas == [0.9, 0.95] and args.backend == "auto"


# =================================================================================================
#                                        Preprocessing
# =================================================================================================
def test_center_crop_arr_adm():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 255, (40, 100, 3), dtype=np.uint8))
    out = center_crop_arr(wide, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # Short side already at the target: a pure center crop, pixel for pixel.
    exact = rng.integers(0, 255, (32, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(exact), 32), exact[:, 9:41])
    # Large images are box-halved first: 4× the target in a constant colour stays that colour.
    flat = Image.fromarray(np.full((128, 192, 3), 77, np.uint8))
    assert (center_crop_arr(flat, 32) == 77).all()
    # Grey → RGB.
    assert center_crop_arr(Image.fromarray(exact[..., 0]), 16).shape == (16, 16, 3)


# =================================================================================================
#                              Fixtures: ImageFolder, tiny VAE, extract
# =================================================================================================
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("imagenet")


@pytest.fixture(scope="module")
def image_folder(workdir):
    rng = np.random.default_rng(0)
    root = workdir / "images"
    for c in range(N_CLASSES):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(PER_CLASS):
            h, w = rng.integers(32, 90, 2)
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"n{c:08d}" / f"img_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def vae_dir(workdir):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    # Three down blocks: a factor-4 VAE (32 px → 8×8×4 latents); SD's has four (factor 8).
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE)
    path = workdir / "tiny-vae"
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def latents(workdir, image_folder, vae_dir):
    out = workdir / "latents"
    log = run(["-m", "meanflow_fast.imagenet.extract", "--data-path", str(image_folder), "--out", str(out),
               "--vae", str(vae_dir), "--image-size", str(IMAGE_SIZE), "--shard-size", "5", "--batch-size", "4",
               "--num-workers", "0", "--device", "cpu"], nproc=2)
    return out, log


def test_extract_shards(latents, image_folder, vae_dir):
    out, log = latents
    n = N_CLASSES * PER_CLASS
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["num_images"] == n and summary["skipped"] == 0 and summary["num_shards"] == 5
    assert summary["classes"] == [f"n{c:08d}" for c in range(N_CLASSES)] and summary["latent_shape"] == [4, 8, 8]
    shards = sorted(out.glob("shard-*.safetensors"))
    assert [read_shard_meta(str(s))["count"] for s in shards] == [5, 5, 5, 5, 4]
    ds = LatentShards(str(out))
    assert len(ds) == 2 * n and ds.latent_shape == (4, 8, 8) and ds.num_classes == N_CLASSES
    assert ds.labels.tolist() == [c for c in range(N_CLASSES) for _ in range(PER_CLASS)]
    # Item 2i is image i, item 2i + 1 its flipped copy: both the VAE's posterior mean × 0.18215.
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    path = sorted((image_folder / "n00000001").iterdir())[2]
    img = center_crop_arr(Image.open(path), IMAGE_SIZE)
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * LATENT_SCALE
        want_flip = vae.encode(x.flip(3)).latent_dist.mean * LATENT_SCALE
    i = PER_CLASS + 2
    z, y = ds[2 * i]
    zf, yf = ds[2 * i + 1]
    assert y == 1 and yf == 1
    torch.testing.assert_close(z, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(zf, want_flip[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(z, zf)


def test_extract_resumes_skipping_finished_shards(latents, image_folder, vae_dir, capsys):
    from meanflow_fast.imagenet import extract
    out, _ = latents
    os.remove(out / "shard-00003.safetensors")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    extract.cli(["--data-path", str(image_folder), "--out", str(out), "--vae", str(vae_dir), "--image-size",
                 str(IMAGE_SIZE), "--shard-size", "5", "--batch-size", "4", "--num-workers", "0", "--device", "cpu"])
    assert "1 of 5 shards to do" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.safetensors")}
    assert set(after) == set(before) | {"shard-00003.safetensors"}
    assert all(after[k] == v for k, v in before.items())  # finished shards untouched
    assert read_shard_meta(str(out / "shard-00003.safetensors"))["count"] == 5


# =================================================================================================
#                                  Train (2 ranks), resume, sample, FID
# =================================================================================================
TRAIN = ["-m", "meanflow_fast.imagenet.train", "--preset", "tiny", "--global-batch-size", "4", "--ckpt-every", "2",
         "--log-every", "2", "--sample-every", "2", "--sample-count", "4", "--num-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(workdir, latents, vae_dir):
    out, _ = latents
    run_dir = workdir / "run"
    common = TRAIN + ["--data-path", str(out), "--results-dir", str(run_dir), "--vae", str(vae_dir)]
    log1 = run(common + ["--max-steps", "4"], nproc=2)
    log2 = run(common + ["--max-steps", "6", "--resume", "latest"], nproc=2)
    return run_dir, log1, log2


def test_train_ddp_and_resume(trained):
    run_dir, log1, log2 = trained
    ckpts = run_dir / "checkpoints"
    assert list_checkpoints(str(ckpts)) == [2, 4, 6]
    assert "2 rank(s) × batch 2" in log1 and "images/s" in log1 and "raw loss" in log1
    assert "resumed from" in log2 and "step 4" in log2
    # The last log line arrives although a finished gloo worker skips the interpreter's teardown.
    assert "done: 4 steps" in log1 and "done: 6 steps" in log2
    # DDP is built with torch's current arguments: no rank prints a deprecation warning.
    assert "broadcast_buffers" not in log1 + log2
    meta, tensors = load_checkpoint(str(ckpts / "0000006.json"))
    assert meta["step"] == 6 and meta["world_size"] == 2 and meta["epoch_pos"] == 6
    assert meta["args"]["omega"] == 1.0 and meta["args"]["kappa"] == 0.5  # the preset's
    assert meta["model_config"]["input_size"] == 8 and meta["model_config"]["num_classes"] == N_CLASSES
    assert {"rng.0.torch", "rng.1.torch", "rng.0.loss_gen", "rng.1.loss_gen"} <= set(tensors)
    assert len(meta["rng"]) == 2
    # Adam has taken 6 steps; weights moved away from the step-2 checkpoint; everything finite.
    assert all(float(v) == 6.0 for k, v in tensors.items() if k.endswith(".step"))
    _, t2 = load_checkpoint(str(ckpts / "0000002.json"))
    model6, model2 = prefixed(tensors, "model"), prefixed(t2, "model")
    assert any(not torch.equal(model6[k], model2[k]) for k in model6)
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    pngs = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert pngs == ["0000002.png", "0000004.png", "0000006.png"]
    assert Image.open(run_dir / "samples" / "0000006.png").size[0] > IMAGE_SIZE  # VAE-decoded 32 px tiles


def test_sample_and_fid(trained, vae_dir, workdir, tmp_path, capsys):
    run_dir, _, _ = trained
    npz = tmp_path / "samples.npz"
    run(["-m", "meanflow_fast.imagenet.sample", "--ckpt", str(run_dir), "--vae", str(vae_dir), "--num-samples", "7",
         "--batch-size", "2", "--out", str(npz), "--device", "cpu"], nproc=2)
    with np.load(npz) as d:
        arr, labels = d["arr_0"], d["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (7, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert not list(tmp_path.glob("*.part-*"))  # per-rank parts cleaned up
    # Same seed, one process, another batch size → the same images (noise seeded per sample index).
    from meanflow_fast.imagenet import sample as sample_cmd
    one = tmp_path / "one.npz"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun ranks (OMP_NUM_THREADS=1): a CPU GEMM's sums follow the thread count
    try:
        sample_cmd.cli(["--ckpt", str(run_dir / "checkpoints" / "0000006.safetensors"), "--vae", str(vae_dir),
                        "--num-samples", "3", "--batch-size", "3", "--out", str(one), "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    with np.load(one) as d:
        np.testing.assert_array_equal(d["arr_0"], arr[:3])

    # FID with a randomly initialised FID Inception saved to a file (there are no downloads), its features
    # of order 1; the distance against one computed here from the same features, independently.
    from meanflow_fast.imagenet import fid as fid_cmd
    from tests.test_vae_and_fid import frechet_from_features, random_fid_inception
    net = random_fid_inception()
    weights = tmp_path / "pt_inception-random.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(1)
    ref = tmp_path / "ref.npz"
    ref_images = rng.integers(0, 255, (6, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    np.savez(ref, arr_0=ref_images)
    stats = tmp_path / "ref_stats.npz"
    capsys.readouterr()
    torch.set_num_threads(1)  # as the meanflow-fid process below, whose FID must agree to 1e-9
    try:
        fid = fid_cmd.cli([str(npz), "--ref", str(ref), "--inception-weights", str(weights), "--save-ref-stats",
                           str(stats), "--out", str(tmp_path / "fid.json"), "--device", "cpu"])
        with torch.no_grad():
            feats = [net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).double().numpy()
                     for x in (arr, ref_images)]
        assert fid == pytest.approx(frechet_from_features(*feats), rel=1e-6) and fid > 1e-3
        # 7 samples and 6 images against 2,048 feature dimensions: computed, but with one warning.
        out = capsys.readouterr().out
        assert out.count("too few images") == 1 and "samples 7" in out and "reference 6" in out, out
        with np.load(stats) as d:
            assert d["mu"].shape == (2048,) and d["sigma"].shape == (2048, 2048)
        # Reference statistics instead of images: the same number; a set against itself: 0.
        fid2 = fid_cmd.cli([str(npz), "--ref", str(stats), "--inception-weights", str(weights), "--device", "cpu"])
        assert fid2 == pytest.approx(fid, rel=1e-9)
        assert fid_cmd.cli([str(npz), "--ref", str(npz), "--inception-weights", str(weights), "--device", "cpu"]) \
            == pytest.approx(0.0, abs=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "fid.json").read_text())["fid"] == pytest.approx(fid)
    # The meanflow-fid command: exit status 0 and the FID in --out (sys.exit(cli()) exited 1 with the FID).
    p = console_script("meanflow-fid", [str(npz), "--ref", str(stats), "--inception-weights", str(weights),
                                        "--out", str(tmp_path / "fid2.json"), "--device", "cpu"])
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert json.loads((tmp_path / "fid2.json").read_text())["fid"] == pytest.approx(fid, rel=1e-9)


# =================================================================================================
#                                DDP gradient synchronisation
# =================================================================================================
DDP_CHECK = textwrap.dedent('''
    import copy, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from meanflow_fast import MeanFlowLoss, meanflow_dit
    from meanflow_fast.imagenet.common import end_process
    from meanflow_fast.training import MeanFlowObjective, train_step

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = meanflow_dit("tiny", input_size=4, in_channels=2, depth=1, hidden_size=32, num_heads=2,
                         num_classes=3, freq_dim=16)
    with torch.no_grad():  # off the adaLN-Zero init, so that every parameter gets a gradient
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    loss_fn = MeanFlowLoss(omega=1.0, kappa=0.5)  # guided: no-grad evaluations inside DDP's forward too
    ddp = DDP(MeanFlowObjective(model, loss_fn))
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    x, y = torch.randn(4, 2, 4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)
    gen = lambda: torch.Generator().manual_seed(7 + rank)
    flat = lambda m: torch.cat([p.grad.flatten() for p in m.parameters()])

    # Reference: each rank's local gradient (no DDP), averaged over ranks by hand.
    ref = copy.deepcopy(model)
    loss_fn(ref, x, y, generator=gen())[0].backward()
    local = flat(ref)
    avg = local.clone()
    dist.all_reduce(avg)
    avg /= world

    # The wrong way: the loss on ddp.module's network bypasses DDP's forward → no all-reduce.
    loss_fn(ddp.module.model, x, y, generator=gen())[0].backward()
    naive = flat(model)
    torch.testing.assert_close(naive, local)
    others = [torch.empty_like(naive) for _ in range(world)]
    dist.all_gather(others, naive)
    assert not torch.allclose(others[0], others[1]), "naive path unexpectedly synchronised"
    model.zero_grad(set_to_none=True)

    # The right way: train_step on DDP(MeanFlowObjective): gradients = the average; weights stay equal.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_step(ddp, None, opt, x, y, generator=gen())
    assert stats["skipped"] == 0.0
    torch.testing.assert_close(flat(model), avg, rtol=1e-5, atol=1e-6)
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    ws = [torch.empty_like(w) for _ in range(world)]
    dist.all_gather(ws, w)
    assert torch.equal(ws[0], ws[1]), "weights differ across ranks after a DDP step"
    assert not torch.equal(w, torch.cat([b.flatten() for b in before])), "weights did not change"

    # A NaN on one rank only: every rank skips the step (the decision is all-reduced).
    x_bad = x.clone()
    if rank == 1:
        x_bad[0, 0, 0, 0] = float("nan")
    stats = train_step(ddp, None, opt, x_bad, y, generator=gen())
    assert stats["skipped"] == 1.0, stats
    assert torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), w)
    if rank == 0:
        print("DDP-SYNC-OK")
    # Leave as the commands do: the interpreter's teardown can abort a finished gloo worker (end_process).
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    end_process(0)
''')


def test_ddp_gradients_synchronised_through_forward_jvp(tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK)
    assert "DDP-SYNC-OK" in run([str(script)], nproc=2)


# =================================================================================================
#                         Latent conventions and the posterior-sampling loader
# =================================================================================================
# The official iMF per-channel constants (its utils/vae_util.py), typed by hand.
IMF_MEAN = [0.86488, -0.27787343, 0.21616915, 0.3738409]
IMF_STD = [4.85503674, 5.31922414, 3.93725398, 3.9870003]


def test_latent_norms_against_hand_formulas():
    from meanflow_fast.imagenet.latents import denormalize, normalize, normalize_std
    raw = torch.randn(3, 4, 5, 7, dtype=torch.float64) * 6 + 1
    raw_std = torch.rand(3, 4, 5, 7, dtype=torch.float64) + 0.01
    # imf-channel: (raw − mean_c) / std_c, element by element.
    want = raw.clone()
    for c in range(4):
        want[:, c] = (raw[:, c] - IMF_MEAN[c]) / IMF_STD[c]
    torch.testing.assert_close(normalize(raw, "imf-channel"), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(denormalize(want, "imf-channel"), raw, rtol=0, atol=1e-12)
    torch.testing.assert_close(normalize_std(raw_std, "imf-channel")[:, 2], raw_std[:, 2] / 3.93725398,
                               rtol=0, atol=1e-12)
    # sd-0.18215: raw · 0.18215.
    torch.testing.assert_close(normalize(raw, "sd-0.18215"), raw * 0.18215, rtol=0, atol=1e-12)
    torch.testing.assert_close(denormalize(raw * 0.18215, "sd-0.18215"), raw, rtol=0, atol=1e-12)
    torch.testing.assert_close(normalize_std(raw_std, "sd-0.18215"), raw_std * 0.18215, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="latent_norm must be one of"):
        normalize(raw, "sd-0.13025")
    with pytest.raises(ValueError, match="4-channel"):
        normalize(torch.zeros(2, 3, 4, 4), "imf-channel")


def _posterior_shards(tmp_path, n=5, seed=0):
    from meanflow_fast.imagenet.data import write_shard
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 3, 5, generator=g)
    std = torch.rand(n, 4, 3, 5, generator=g) * 0.5 + 0.1
    mean_f, std_f = torch.randn(n, 4, 3, 5, generator=g), torch.rand(n, 4, 3, 5, generator=g) * 0.5 + 0.1
    write_shard(str(tmp_path / "shard-00000.safetensors"), mean, mean_f, torch.arange(n) % 2,
                {"image_size": 24, "latent_norm": "imf-channel", "latent_mode": "mean-std", "vae": "synthetic",
                 "num_classes": 2, "expected": n, "skipped": 0}, stds=(std, std_f))
    return mean, std, mean_f, std_f


def test_posterior_loader_fresh_draws(tmp_path):
    from meanflow_fast.imagenet.data import ResumableDistributedSampler
    mean, std, mean_f, std_f = _posterior_shards(tmp_path)
    ds = LatentShards(str(tmp_path), seed=3)
    assert ds.posterior and ds.latent_norm == "imf-channel"
    # Fresh draws: another epoch, another draw; the same (seed, epoch, item), the same draw.
    a0, b0, a1 = ds[(4, 0)][0], LatentShards(str(tmp_path), seed=3)[(4, 0)][0], ds[(4, 1)][0]
    assert torch.equal(a0, b0) and not torch.allclose(a0, a1)
    assert not torch.allclose(a0, LatentShards(str(tmp_path), seed=4)[(4, 0)][0])
    # Item 2i + 1 draws around the flipped latent's moments.
    draws = torch.stack([ds[(3, e)][0] for e in range(3000)])
    k = 3000 ** 0.5
    assert ((draws.mean(0) - mean_f[1]).abs() < 5 * std_f[1] / k).all()
    assert ((draws.std(0) - std_f[1]).abs() < 5 * std_f[1] / (2 * 3000) ** 0.5).all()
    # ... and independent across elements: the standardised draws are N(0, 1) overall.
    eps = (draws - mean_f[1]) / std_f[1]
    assert abs(float(eps.mean())) < 0.01 and abs(float(eps.std()) - 1) < 0.01
    # Two ranks' samplers yield (index, epoch) pairs that cover the epoch, and the draws depend only on those.
    samplers = [ResumableDistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True,
                                            with_epoch=True) for r in range(2)]
    for s in samplers:
        s.set_position(2, 0)
    pairs = [p for s in samplers for p in s]
    assert sorted(j for j, _ in pairs) == list(range(10)) and {e for _, e in pairs} == {2}
    loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=samplers[1], num_workers=0)
    (x, _), = list(loader)
    torch.testing.assert_close(x, torch.stack([ds[p][0] for p in samplers[1]]), rtol=0, atol=0)


# =================================================================================================
#                       iMF: extract (mean-std, imf-channel) → train → resume → sample → FID
# =================================================================================================
@pytest.fixture(scope="module")
def imf_latents(workdir, image_folder, vae_dir):
    out = workdir / "latents-imf"
    log = run(["-m", "meanflow_fast.imagenet.extract", "--data-path", str(image_folder), "--out", str(out),
               "--vae", str(vae_dir), "--image-size", str(IMAGE_SIZE), "--shard-size", "16", "--batch-size", "8",
               "--num-workers", "0", "--device", "cpu", "--latents", "mean-std", "--latent-norm", "imf-channel"])
    return out, log


def test_imf_extract_mean_std(imf_latents, image_folder, vae_dir):
    out, log = imf_latents
    assert "mean-std" in log and "imf-channel" in log
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["latent_norm"] == "imf-channel" and summary["latent_mode"] == "mean-std"
    assert "latent_scale" not in summary
    from safetensors.torch import load_file
    shard = load_file(str(out / "shard-00000.safetensors"))
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    path = sorted((image_folder / "n00000000").iterdir())[5]
    x = torch.from_numpy(center_crop_arr(Image.open(path), IMAGE_SIZE).copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        post = vae.encode(x.flip(3) / 127.5 - 1).latent_dist
    m = torch.tensor(IMF_MEAN).view(4, 1, 1)
    s = torch.tensor(IMF_STD).view(4, 1, 1)
    torch.testing.assert_close(shard["latents_flip"][5], (post.mean[0] - m) / s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shard["latents_flip_std"][5], post.std[0] / s, rtol=1e-4, atol=1e-6)


IMF_TRAIN = ["-m", "meanflow_fast.imagenet.train", "--method", "imf", "--preset", "tiny", "--global-batch-size", "4",
             "--ckpt-every", "2", "--log-every", "1", "--sample-every", "2", "--sample-count", "4", "--num-workers",
             "0", "--device", "cpu", "--warmup-epochs", "0.5", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def imf_trained(workdir, imf_latents, vae_dir):
    out, _ = imf_latents
    run_dir = workdir / "run-imf"
    common = IMF_TRAIN + ["--data-path", str(out), "--results-dir", str(run_dir), "--vae", str(vae_dir)]
    log1 = run(common + ["--max-steps", "2"], nproc=2)
    log2 = run(common + ["--max-steps", "4", "--resume", "latest"])
    return run_dir, log1, log2


def test_imf_train_and_resume(imf_trained):
    from meanflow_fast.weights import load_model, read_model_info
    run_dir, log1, log2 = imf_trained
    assert "iMF tiny" in log1 and "loss u" in log1 and "loss v" in log1 and "2 rank(s) × batch 2" in log1
    assert "latents: imf-channel convention, a fresh posterior draw per use" in log1 and "tiny-vae" in log1
    # The official recipe's defaults, except the flags given; warm-up: 0.5 · 24 images / 4 = 3 steps, update
    # k (from 0) at lr·k/3, the learning rate logged being the last update's.
    assert "ema_decay=0.9999" in log1 and "adam_betas=[0.9, 0.95]" in log1 and "precision=fp32" in log1
    assert "| lr 0 |" in log1 and "lr 0.000333" in log1
    assert "resumed from" in log2 and "done: 4 steps" in log2 and "lr 0.000667" in log2 and "lr 0.001 " in log2
    assert list_checkpoints(str(run_dir / "checkpoints")) == [2, 4]
    meta, tensors = load_checkpoint(str(run_dir / "checkpoints" / "0000004.json"))
    assert meta["architecture"] == "IMFDiT" and meta["latent_norm"] == "imf-channel"
    assert meta["args"]["method"] == "imf" and meta["args"]["omega_max"] == 8.0
    assert meta["model_config"]["num_classes"] == N_CLASSES and meta["model_config"]["v_head"] is True
    assert all(float(v) == 4.0 for k, v in tensors.items() if k.endswith(".step"))
    info = read_model_info(str(run_dir / "ema.safetensors"))
    assert (info.architecture, info.latent_norm, info.step) == ("IMFDiT", "imf-channel", 4)
    assert read_model_info(str(run_dir)).latent_norm == "imf-channel"
    ema = load_model(str(run_dir / "ema.safetensors"))
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, tensors["ema." + k], rtol=0, atol=0)
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["0000002.png", "0000004.png"]


def _decode_by_hand(vae_dir, z):
    """Latents in imf-channel → uint8 images: z·std + mean, then the VAE decoder."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval()
    raw = z * torch.tensor(IMF_STD).view(1, 4, 1, 1) + torch.tensor(IMF_MEAN).view(1, 4, 1, 1)
    with torch.no_grad():
        x = vae.decode(raw).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _assert_images_close(got, want):
    """uint8 images equal up to a rounding step in a few pixels (GEMM sums differ across thread counts)."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_imf_sample_and_fid(imf_trained, vae_dir, tmp_path):
    from meanflow_fast import sample
    from meanflow_fast.imagenet import fid as fid_cmd
    from meanflow_fast.imagenet import sample as sample_cmd
    from meanflow_fast.imagenet.sample import sample_noise
    from meanflow_fast.weights import load_model
    run_dir, _, _ = imf_trained
    npz = tmp_path / "imf.npz"
    sample_cmd.cli(["--ckpt", str(run_dir), "--vae", str(vae_dir), "--num-samples", "5", "--batch-size", "3",
                    "--out", str(npz), "--device", "cpu", "--omega", "2.5", "--t-min", "0.2", "--t-max", "0.9"])
    with np.load(npz) as d:
        arr, labels = d["arr_0"], d["arr_1"]
    assert arr.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and labels.tolist() == [0, 1, 2, 0, 1]
    model = load_model(str(run_dir))
    y = torch.arange(5) % N_CLASSES
    z = sample(model, y, noise=sample_noise(range(5), (4, 8, 8), 0), omega=2.5, t_min=0.2, t_max=0.9)
    _assert_images_close(arr, _decode_by_hand(vae_dir, z))
    # --omega alone: the interval is the tiny size's default, [0, 1].
    npz2 = tmp_path / "imf2.npz"
    sample_cmd.cli(["--ckpt", str(run_dir), "--vae", str(vae_dir), "--num-samples", "5", "--out", str(npz2),
                    "--device", "cpu", "--omega", "6"])
    z6 = sample(model, y, noise=sample_noise(range(5), (4, 8, 8), 0), omega=6.0, t_min=0.0, t_max=1.0)
    with np.load(npz2) as d:
        _assert_images_close(d["arr_0"], _decode_by_hand(vae_dir, z6))
    # FID of the iMF samples against random images, with a random FID Inception, against features by hand.
    from tests.test_vae_and_fid import frechet_from_features, random_fid_inception
    net = random_fid_inception()
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    ref_images = np.random.default_rng(2).integers(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    fid = fid_cmd.cli([str(npz), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", str(weights),
                       "--device", "cpu"])
    with torch.no_grad():
        feats = [net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).double().numpy() for x in (arr, ref_images)]
    assert fid == pytest.approx(frechet_from_features(*feats), rel=1e-4) and fid > 1e-3


@pytest.mark.parametrize("layout", ["u-only", "with v-head"])
def test_sample_official_imf_checkpoint(layout, vae_dir, tmp_path):
    """An official-layout .pth (net. prefix) samples what the same model samples here, decoded in imf-channel."""
    from meanflow_fast import imf_dit, sample
    from meanflow_fast.imagenet import sample as sample_cmd
    from meanflow_fast.imagenet.sample import sample_noise
    from meanflow_fast.imf.official import official_state_dict
    torch.manual_seed(5)
    model = imf_dit("tiny", num_classes=N_CLASSES, v_head=layout == "with v-head")
    with torch.no_grad():  # off the zero init, so that u is not 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = official_state_dict(model, prefix="net.")
    assert all(k.startswith("net.") for k in sd) and any("u_heads" in k for k in sd)
    assert any("v_heads" in k for k in sd) == (layout == "with v-head")
    pth = tmp_path / "iMF-tiny.pth"
    torch.save(sd, pth)
    npz = tmp_path / "official.npz"
    sample_cmd.cli(["--ckpt", str(pth), "--input-size", "8", "--vae", str(vae_dir), "--num-samples", "4",
                    "--out", str(npz), "--device", "cpu", "--omega", "3", "--t-min", "0.1", "--t-max", "0.7"])
    y = torch.arange(4) % N_CLASSES
    noise = sample_noise(range(4), (4, 8, 8), 0)
    z = sample(model.eval(), y, noise=noise, omega=3.0, t_min=0.1, t_max=0.7)
    assert not torch.allclose(z, sample(model, y, noise=noise, omega=1.0, t_min=0.1, t_max=0.7), atol=1e-3)
    with np.load(npz) as d:
        _assert_images_close(d["arr_0"], _decode_by_hand(vae_dir, z))


def test_imf_usage_errors(imf_latents, imf_trained, trained, vae_dir, tmp_path):
    from meanflow_fast.imagenet import sample as sample_cmd
    from meanflow_fast.imagenet import train as train_cmd
    from meanflow_fast.imagenet.common import UsageError
    out, _ = imf_latents
    base = ["--data-path", str(out), "--results-dir", str(tmp_path / "r"), "--device", "cpu", "--num-workers", "0"]
    args = _parsed(train_cmd, base + ["--method", "imf", "--preset", "tiny", "--latent-norm", "sd-0.18215",
                                      "--max-steps", "1", "--global-batch-size", "4"])
    train_cmd.check_args(args)
    with pytest.raises(UsageError, match="--latent-norm sd-0.18215: the latents in --data-path .* imf-channel"):
        train_cmd.main(args)
    with pytest.raises(UsageError, match="--kappa: not a setting of --method imf"):
        train_cmd.check_args(_parsed(train_cmd, base + ["--method", "imf", "--kappa", "0.5"]))
    with pytest.raises(UsageError, match="--omega-max: not a setting of --method meanflow"):
        train_cmd.check_args(_parsed(train_cmd, base + ["--omega-max", "4"]))
    assert not (tmp_path / "r").exists()
    run_dir, _, _ = trained
    with pytest.raises(UsageError, match="--omega: sampling settings of an iMF model; .* is a MeanFlowDiT"):
        sample_cmd.check_args(_parsed(sample_cmd, ["--ckpt", str(run_dir), "--vae", str(vae_dir), "--omega", "2"]))
    with pytest.raises(UsageError, match="--t-min and --t-max must satisfy"):
        sample_cmd.check_args(_parsed(sample_cmd, ["--ckpt", str(imf_trained[0]), "--vae", str(vae_dir),
                                                   "--t-min", "0.8", "--t-max", "0.2"]))
    with pytest.raises(UsageError, match="no such file"):
        sample_cmd.check_args(_parsed(sample_cmd, ["--ckpt", str(tmp_path / "iMF-B-2.pth"), "--vae", str(vae_dir)]))


def _parsed(module, argv):
    return module.build_parser().parse_args(argv)
