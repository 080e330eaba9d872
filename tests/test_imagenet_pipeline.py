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
