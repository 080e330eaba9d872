"""Reliability (issue #7): input validation with clear messages, non-finite steps, kill-and-resume
bit-for-bit, atomic checkpoints, corrupt images in extraction."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from meanflow_fast import MeanFlowLoss, meanflow_dit
from meanflow_fast.imagenet import extract, fid, sample, train
from meanflow_fast.imagenet.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from meanflow_fast.imagenet.common import UsageError
from meanflow_fast.imagenet.data import LatentShards, ResumableDistributedSampler, center_crop_arr, write_shard
from meanflow_fast.imagenet.inception import FIDInceptionV3, load_fid_inception
from meanflow_fast.io import atomic_write, load_json, save_json, save_npz, save_safetensors
from meanflow_fast.training import EMA, BadStepCounter, MeanFlowObjective, NonFiniteTrainingError, train_step
from tests.helpers import run_killed_past

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CLASSES = 3


# =================================================================================================
#                                            Fixtures
# =================================================================================================
def make_shards(folder, n_per_shard=(10, 10), num_classes=N_CLASSES, label_max=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for k, n in enumerate(n_per_shard):
        z = torch.randn(n, 4, 8, 8, generator=g)
        y = torch.randint(0, num_classes, (n,), generator=g)
        if label_max is not None:
            y[-1] = label_max
        write_shard(os.path.join(folder, f"shard-{k:05d}.safetensors"), z, z.flip(3) + 0.1, y,
                    {"image_size": 64, "latent_scale": 0.18215, "latent_mode": "mean", "vae": "synthetic",
                     "num_classes": num_classes, "expected": n, "skipped": 0})
    return str(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


TRAIN_ARGS = ["--preset", "tiny", "--global-batch-size", "4", "--sample-every", "0", "--log-every", "1",
              "--num-workers", "0", "--device", "cpu"]


def train_argv(shards, results, *extra):
    return ["--data-path", shards, "--results-dir", str(results), *TRAIN_ARGS, *extra]


@pytest.fixture(scope="module")
def one_step_run(shards, tmp_path_factory):
    """A finished 1-step run (its checkpoint is the starting point of the checkpoint cases)."""
    results = tmp_path_factory.mktemp("run1")
    train.cli(train_argv(shards, results, "--max-steps", "1"))
    return results


def cli_error(cli, argv, capsys) -> str:
    """Run a command expecting a usage error: exit status 2 and the message on stderr."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def _copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# =================================================================================================
#                         Validation: commands (one test per case, message asserted)
# =================================================================================================
def test_train_rejects_zero_batch(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--global-batch-size", "0"), capsys)
    assert "--global-batch-size: must be an integer ≥ 1, got '0'" in err


def test_train_rejects_ema_decay(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--ema-decay", "1.5"), capsys)
    assert "--ema-decay must be in [0, 1), got 1.5" in err


def test_train_rejects_reversed_guidance_interval(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--guidance-interval", "0.8", "0.2"), capsys)
    assert "--guidance-interval must satisfy 0 ≤ T_LO ≤ T_HI ≤ 1, got 0.8 0.2" in err


def test_train_rejects_meaningless_guidance(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--kappa", "1.0"), capsys)
    assert "--kappa must be in [0, 1)" in err and "got 1.0" in err
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--omega", "-0.5"), capsys)
    assert "--omega must be ≥ 0 and finite, got -0.5" in err


def test_train_rejects_negative_lr(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--lr", "-1"), capsys)
    assert "--lr: must be a finite number > 0" in err


def test_train_rejects_unknown_backend(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--backend", "cuda"), capsys)
    assert "--backend: invalid choice: 'cuda'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only message")
def test_train_rejects_triton_backend_without_cuda(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--backend", "triton"), capsys)
    assert "--backend triton needs a CUDA device" in err


def test_train_rejects_heads_not_dividing_width(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--hidden-size", "66", "--num-heads", "4"), capsys)
    assert "--hidden-size (66) must be divisible by --num-heads (4)" in err


def test_train_rejects_missing_data_path(tmp_path, capsys):
    err = cli_error(train.cli, train_argv(str(tmp_path / "nope"), tmp_path / "r"), capsys)
    assert "does not exist or is not a directory" in err and "--data-path" in err


def test_train_rejects_folder_without_shards(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = cli_error(train.cli, train_argv(str(tmp_path / "empty"), tmp_path / "r"), capsys)
    assert "has no latent shards (shard-*.safetensors); run meanflow-extract first" in err


def test_train_rejects_malformed_shard(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "shard-00000.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    err = cli_error(train.cli, train_argv(str(d), tmp_path / "r"), capsys)
    assert "is not a valid latent shard" in err


def test_train_rejects_labels_out_of_range(tmp_path, capsys):
    d = make_shards(tmp_path / "labels", n_per_shard=(8,), label_max=5)  # num_classes 3, labels up to 5
    err = cli_error(train.cli, train_argv(d, tmp_path / "r"), capsys)
    assert "labels out of range" in err and "allowed [0, 3)" in err


def test_train_rejects_batch_larger_than_data(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path / "r", "--global-batch-size", "64"), capsys)
    assert "--global-batch-size 64 is larger than the data allows" in err


def test_train_rejects_missing_resume_checkpoint(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--resume", str(tmp_path / "0000100.json")), capsys)
    assert "checkpoint not found" in err


def test_train_resume_latest_without_checkpoints(shards, tmp_path, capsys):
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--resume", "latest"), capsys)
    assert "no checkpoint found in" in err


def _train_usage_failure(case, shards, one_step_run, tmp_path):
    """(argv, expected message) of a meanflow-train usage failure found only after check_args."""
    if case == "empty data dir":
        (tmp_path / "empty").mkdir()
        return train_argv(str(tmp_path / "empty"), tmp_path / "r"), "has no latent shards"
    if case == "batch larger than the data":
        return (train_argv(shards, tmp_path / "r", "--global-batch-size", "64"),
                "--global-batch-size 64 is larger than the data allows")
    if case == "VAE folder without config.json":
        (tmp_path / "no-vae").mkdir()
        return (train_argv(shards, tmp_path / "r", "--sample-every", "1", "--vae", str(tmp_path / "no-vae")),
                "not a diffusers AutoencoderKL directory")
    assert case == "resume from another run that does not match"
    return (train_argv(shards, tmp_path / "r", "--resume", str(one_step_run), "--global-seed", "5"),
            "the checkpoint does not match this run")


TRAIN_USAGE_FAILURES = ["empty data dir", "batch larger than the data", "VAE folder without config.json",
                        "resume from another run that does not match"]


@pytest.mark.parametrize("case", TRAIN_USAGE_FAILURES)
def test_train_usage_error_creates_no_results_dir(case, shards, one_step_run, tmp_path, capsys):
    argv, message = _train_usage_failure(case, shards, one_step_run, tmp_path)
    err = cli_error(train.cli, argv, capsys)
    assert message in err
    assert not (tmp_path / "r").exists(), sorted(os.listdir(tmp_path / "r"))


@pytest.mark.parametrize("case", TRAIN_USAGE_FAILURES)
def test_train_usage_error_leaves_existing_results_dir_unchanged(case, shards, one_step_run, tmp_path, capsys):
    argv, message = _train_usage_failure(case, shards, one_step_run, tmp_path)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    err = cli_error(train.cli, argv, capsys)
    assert message in err
    assert sorted(os.listdir(tmp_path / "r")) == ["notes.txt"]


def test_resume_rejects_mismatched_run(shards, one_step_run, tmp_path, capsys):
    run = _copy_run(one_step_run, tmp_path / "run")
    err = cli_error(train.cli, train_argv(shards, run, "--resume", "latest", "--depth", "3", "--max-steps", "2"),
                    capsys)
    assert "the checkpoint does not match this run: depth: checkpoint 2, now 3" in err


def test_resume_rejects_truncated_checkpoint(shards, one_step_run, tmp_path, capsys):
    run = _copy_run(one_step_run, tmp_path / "run")
    t = run / "checkpoints" / "0000001.safetensors"
    t.write_bytes(t.read_bytes()[:1000])
    err = cli_error(train.cli, train_argv(shards, run, "--resume", "latest", "--max-steps", "2"), capsys)
    assert "is truncated or was replaced" in err


def test_resume_rejects_malformed_state_file(shards, one_step_run, tmp_path, capsys):
    run = _copy_run(one_step_run, tmp_path / "run")
    (run / "checkpoints" / "0000001.json").write_text('{"format": "meanflow-train-ckpt-v1", "step": ')
    err = cli_error(train.cli, train_argv(shards, run, "--resume", "latest", "--max-steps", "2"), capsys)
    assert "is malformed (not valid JSON" in err


def test_extract_rejects_image_size(tmp_path, capsys):
    err = cli_error(extract.cli, ["--data-path", str(tmp_path), "--out", str(tmp_path / "o"), "--image-size", "30"],
                    capsys)
    assert "--image-size must be a multiple of 8" in err


def test_extract_rejects_folder_without_classes(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    err = cli_error(extract.cli, ["--data-path", str(tmp_path / "flat"), "--out", str(tmp_path / "o"),
                                  "--device", "cpu"], capsys)
    assert "has no class folders" in err


def test_extract_rejects_zero_shard_size(tmp_path, capsys):
    err = cli_error(extract.cli, ["--data-path", str(tmp_path), "--out", str(tmp_path / "o"), "--shard-size", "0"],
                    capsys)
    assert "--shard-size: must be an integer ≥ 1, got '0'" in err


def test_extract_rejects_shards_from_other_settings(tmp_path, capsys):
    (tmp_path / "img" / "c0").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(tmp_path / "img" / "c0" / f"{i}.png")
    make_shards(tmp_path / "out", n_per_shard=(3,))  # image_size 64, not 16
    err = cli_error(extract.cli, ["--data-path", str(tmp_path / "img"), "--out", str(tmp_path / "out"),
                                  "--image-size", "16", "--device", "cpu"], capsys)
    assert "exists but was written with image_size=64, not 16" in err


def test_extract_usage_error_creates_no_out_dir(tmp_path, capsys):
    (tmp_path / "img" / "c0").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "img" / "c0" / "0.png")
    (tmp_path / "no-vae").mkdir()
    err = cli_error(extract.cli, ["--data-path", str(tmp_path / "img"), "--out", str(tmp_path / "out"),
                                  "--vae", str(tmp_path / "no-vae"), "--image-size", "16", "--device", "cpu"], capsys)
    assert "not a diffusers AutoencoderKL directory" in err
    assert not (tmp_path / "out").exists()


def test_sample_rejects_zero_samples(one_step_run, tmp_path, capsys):
    err = cli_error(sample.cli, ["--ckpt", str(one_step_run), "--vae", "x", "--num-samples", "0"], capsys)
    assert "--num-samples: must be an integer ≥ 1, got '0'" in err


def test_sample_rejects_missing_checkpoint(tmp_path, capsys):
    err = cli_error(sample.cli, ["--ckpt", str(tmp_path / "missing.safetensors"), "--vae", "x"], capsys)
    assert "checkpoint not found" in err


def test_sample_rejects_output_name(one_step_run, tmp_path, capsys):
    err = cli_error(sample.cli, ["--ckpt", str(one_step_run), "--vae", "x", "--out", str(tmp_path / "s.png")], capsys)
    assert "--out must end with .npz" in err


def test_sample_rejects_missing_vae_directory(one_step_run, tmp_path, capsys):
    err = cli_error(sample.cli, ["--ckpt", str(one_step_run), "--vae", str(tmp_path / "no-vae"), "--out",
                                 str(tmp_path / "s.npz"), "--device", "cpu", "--num-samples", "2"], capsys)
    assert f"--vae {tmp_path / 'no-vae'}: no such directory" in err and "hub id" in err


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "incep.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return str(path)


def test_fid_rejects_npz_without_arr_0(inception_file, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    err = cli_error(fid.cli, [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--inception-weights",
                              inception_file], capsys)
    assert "has no 'arr_0' array (found ['images'])" in err


def test_fid_rejects_float_images(inception_file, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    err = cli_error(fid.cli, [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--inception-weights",
                              inception_file], capsys)
    assert "arr_0 must be uint8 (N, H, W, 3) images, got float32 (4, 8, 8, 3)" in err


def test_fid_rejects_ref_stats_of_wrong_size(inception_file, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    err = cli_error(fid.cli, [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                              inception_file, "--device", "cpu"], capsys)
    assert "mu must be (2048,) and sigma (2048, 2048), got (64,), (64, 64)" in err


def test_fid_rejects_missing_inception_weights(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    err = cli_error(fid.cli, [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--inception-weights",
                              str(tmp_path / "pt_inception.pth")], capsys)
    assert "--inception-weights" in err and "not found" in err


# =================================================================================================
#                        Validation: library functions (one test per case)
# =================================================================================================
def test_inception_weights_with_wrong_keys(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(UsageError, match="is not the FID Inception-v3: .* missing key"):
        load_fid_inception(str(tmp_path / "w.pth"))


def test_inception_rejects_wrong_input_shape():
    with pytest.raises(ValueError, match=r"x must be a float tensor \(B, 3, H, W\) with values in \[0, 1\], "
                                         r"got torch.float32 \(2, 1, 16, 16\)"):
        FIDInceptionV3()(torch.rand(2, 1, 16, 16))


def test_center_crop_rejects_size():
    with pytest.raises(ValueError, match="image_size must be an int ≥ 1, got 0"):
        center_crop_arr(Image.new("RGB", (8, 8)), 0)


def test_latent_dataset_index_out_of_range(shards):
    with pytest.raises(IndexError, match=r"index 40 out of range \[0, 40\)"):
        LatentShards(shards)[40]


def test_sampler_position_out_of_range(shards):
    s = ResumableDistributedSampler(LatentShards(shards), num_replicas=1, rank=0, seed=0)
    with pytest.raises(ValueError, match=r"start must be in \[0, 40\], got 41"):
        s.set_position(0, 41)


def _tiny():
    return meanflow_dit("tiny", input_size=4, in_channels=2, depth=1, hidden_size=32, num_heads=2, num_classes=3,
                        freq_dim=16)


def test_ema_rejects_other_model():
    ema = EMA(_tiny(), decay=0.9)
    with pytest.raises(ValueError, match="model does not match the EMA's model"):
        ema.update(meanflow_dit("tiny", input_size=4, in_channels=2, depth=2, hidden_size=32, num_heads=2,
                                num_classes=3, freq_dim=16))


def test_train_step_rejects_grad_norm():
    model = _tiny()
    with pytest.raises(ValueError, match="max_grad_norm must be > 0 or None, got 0"):
        train_step(model, MeanFlowLoss(), torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 2, 4, 4),
                   torch.tensor([0, 1]), max_grad_norm=0)


def test_train_step_rejects_empty_batch():
    model = _tiny()
    with pytest.raises(ValueError, match=r"empty batch \(B = 0\)"):
        train_step(model, MeanFlowLoss(), torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(0, 2, 4, 4),
                   torch.zeros(0, dtype=torch.long))


def test_train_step_rejects_device_mismatch():
    model = _tiny()
    with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
        train_step(model, MeanFlowLoss(), torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 2, 4, 4),
                   torch.tensor([0, 1], device="meta"))


def test_train_step_rejects_r_greater_than_t():
    model = _tiny()
    loss = MeanFlowLoss()
    with pytest.raises(ValueError, match="r must be ≤ t for every sample"):
        loss(model, torch.randn(2, 2, 4, 4), torch.tensor([0, 1]), t=torch.tensor([0.5, 0.5]),
             r=torch.tensor([0.2, 0.7]))


def test_train_step_rejects_labels_out_of_range():
    model = _tiny()
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\), got min 0, max 3"):
        train_step(model, MeanFlowLoss(), torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 2, 4, 4),
                   torch.tensor([0, 3]))


def test_objective_rejects_non_callable_loss():
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        MeanFlowObjective(_tiny(), "meanflow")


def test_bad_step_counter_rejects_limit():
    with pytest.raises(ValueError, match="limit .* must be an int ≥ 1, got 0"):
        BadStepCounter(0)


def test_atomic_write_rejects_directory(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        atomic_write(str(tmp_path), lambda tmp: None)


def test_atomic_writers_give_files_the_mode_of_a_plain_open(tmp_path):
    """Every writer of meanflow_fast.io creates (and replaces) its file with 0o666 minus the umask, as
    open() does, so others on shared storage can read what the umask lets them."""
    def text(path):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write("x")
        atomic_write(path, write)
    writers = {"atomic_write.txt": text,
               "save_json.json": lambda p: save_json({"a": 1}, p),
               "save_npz.npz": lambda p: save_npz(p, arr_0=np.zeros(3)),
               "save_safetensors.safetensors": lambda p: save_safetensors({"w": torch.zeros(2)}, p)}
    got, want = {}, {}
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o027, 0o640)):
        d = tmp_path / oct(umask)
        old = os.umask(umask)
        try:
            for name, write in writers.items():
                write(str(d / name))
                got[oct(umask), name, "new"] = oct(stat.S_IMODE(os.stat(d / name).st_mode))
                write(str(d / name))  # replacing an existing file
                got[oct(umask), name, "replaced"] = oct(stat.S_IMODE(os.stat(d / name).st_mode))
                want[oct(umask), name, "new"] = want[oct(umask), name, "replaced"] = oct(mode)
        finally:
            os.umask(old)
        assert sorted(os.listdir(d)) == sorted(writers)  # no temp file left behind
    assert got == want


def test_save_safetensors_is_read_back_by_the_safetensors_library(tmp_path):
    """Our streaming writer of the format, read by the library's own reader: every dtype we allow, odd,
    empty, 0-d and non-contiguous tensors, metadata; names out of order on input."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(7)
    tensors = {
        "z.f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "a.f32": torch.randn(7, generator=g),
        "m.f16.t": torch.randn(4, 3, generator=g).half().t(),  # non-contiguous
        "b.bf16": torch.randn(2, 3, 5, generator=g).bfloat16(),
        "i64": torch.randint(-10**12, 10**12, (6,), generator=g),
        "i32": torch.randint(-99, 99, (3, 1), generator=g, dtype=torch.int32),
        "i16": torch.tensor([-3, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 9], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    path = str(tmp_path / "t.safetensors")
    save_safetensors(tensors, path, metadata={"format": "x", "n": "3"})
    got = load_file(path)
    assert sorted(got) == sorted(tensors)
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape and torch.equal(got[name], want), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "x", "n": "3"}
    header_len = int.from_bytes(open(path, "rb").read(8), "little")
    assert (8 + header_len) % 8 == 0  # tensor data 8-byte aligned
    assert os.path.getsize(path) == 8 + header_len + sum(v.numel() * v.element_size() for v in tensors.values())


def test_save_safetensors_rejects_bad_input_before_touching_the_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors({"w": torch.ones(2)}, str(path))
    old = path.read_bytes()
    with pytest.raises(ValueError, match=r"tensor 'c' has dtype torch.complex64; allowed: .*torch.float32"):
        save_safetensors({"w": torch.zeros(2), "c": torch.zeros(2, dtype=torch.complex64)}, str(path))
    with pytest.raises(ValueError, match="metadata must map str to str"):
        save_safetensors({"w": torch.zeros(2)}, str(path), metadata={"step": 3})
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["t.safetensors"]


def test_load_json_rejects_malformed(tmp_path):
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(ValueError, match="is malformed"):
        load_json(str(tmp_path / "s.json"))


# =================================================================================================
#                                      Non-finite steps
# =================================================================================================
def test_bad_step_counter_counts_and_stops():
    c = BadStepCounter(3)
    for s in (True, True, False, True, True):
        c.observe(s)
    assert (c.consecutive, c.total) == (2, 4)
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive steps had a non-finite loss or gradient"):
        c.observe(True, step=9)


def _all_finite(tensors):
    return all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_injected_nan_is_skipped_and_never_reaches_weights(shards, tmp_path, capsys):
    train.cli(train_argv(shards, tmp_path, "--max-steps", "3", "--ckpt-every", "1", "--debug-nan-steps", "2"))
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row, 1 in total)" in out
    ck = tmp_path / "checkpoints"
    (m1, t1), (m2, t2), (m3, t3) = (load_checkpoint(str(ck / f"000000{s}.json")) for s in (1, 2, 3))
    assert (m1["skipped_total"], m2["skipped_total"], m3["skipped_total"]) == (0, 1, 1)
    assert all(_all_finite(t) for t in (t1, t2, t3))
    # Step 2 changed nothing: weights, EMA and Adam state at step 2 equal those at step 1.
    for k in t1:
        if k.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(t1[k], t2[k]), k
    assert any(not torch.equal(t2[k], t3[k]) for k in t2 if k.startswith("model."))  # step 3 trained again


def test_consecutive_non_finite_steps_stop_the_run(shards, tmp_path, capsys):
    with pytest.raises(SystemExit, match="3 consecutive steps had a non-finite loss or gradient"):
        train.cli(train_argv(shards, tmp_path, "--max-steps", "10", "--ckpt-every", "1", "--debug-nan-steps", "3-10",
                             "--max-bad-steps", "3"))
    ck = tmp_path / "checkpoints"
    steps = list_checkpoints(str(ck))
    assert steps[:2] == [1, 2] and max(steps) <= 4  # stopped at step 5 (3 bad: 3, 4, 5)
    for s in steps:
        assert _all_finite(load_checkpoint(str(ck / f"{s:07d}.json"))[1])


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    model = _tiny()
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(RuntimeError, match="refusing to write a checkpoint with non-finite values"):
        save_checkpoint(str(tmp_path), 5, model=model, ema_model=model,
                        optimizer=torch.optim.Adam(model.parameters()), state={}, rng_tensors=[], rng_json=[])
    assert os.listdir(tmp_path) == []


def _checkpoint_of(ckpt_dir, step):
    """A checkpoint of a tiny model seeded by ``step``; returns its tensors as written."""
    torch.manual_seed(step)
    nets = {"model": _tiny(), "ema": _tiny()}
    save_checkpoint(str(ckpt_dir), step, model=nets["model"], ema_model=nets["ema"],
                    optimizer=torch.optim.Adam(nets["model"].parameters()), state={"model_config": {}},
                    rng_tensors=[], rng_json=[])
    return {f"{w}.{k}": v for w, net in nets.items() for k, v in net.state_dict().items()}


def test_checkpoint_killed_mid_write_leaves_only_what_the_next_one_cleans(tmp_path):
    """A process killed in the middle of writing a checkpoint's tensors file (SIGXFSZ past a file-size
    limit): the previous checkpoint loads unchanged, the killed step has no checkpoint, and the write left
    only a ``.tmp-*`` file, which the next checkpoint removes (no ``.tmpXXXXXX`` of safetensors' own)."""
    ckpt = tmp_path / "checkpoints"
    want = _checkpoint_of(ckpt, 2)
    size = os.path.getsize(ckpt / "0000002.safetensors")
    proc = run_killed_past(size // 3, "import sys\nfrom tests.test_reliability import _checkpoint_of",
                           "_checkpoint_of(sys.argv[1], 4)", str(ckpt))
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr
    assert list_checkpoints(str(ckpt)) == [2]
    _, got = load_checkpoint(str(ckpt / "0000002.json"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    left = sorted(set(os.listdir(ckpt)) - {"0000002.json", "0000002.safetensors"})
    assert len(left) == 1 and left[0].startswith(".tmp-0000004.safetensors."), left
    _checkpoint_of(ckpt, 6)
    assert sorted(os.listdir(ckpt)) == ["0000002.json", "0000002.safetensors", "0000006.json", "0000006.safetensors"]


# =================================================================================================
#                           Kill mid-run → resume → bit-for-bit the same weights
# =================================================================================================
def _popen(shards, results, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "meanflow_fast.imagenet.train",
           *train_argv(shards, results, "--max-steps", "14", "--ckpt-every", "2", "--log-every", "100", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_and_resume_is_bit_exact(shards, tmp_path):
    """14 steps (crossing the epoch boundary at 10): uninterrupted; SIGKILLed after its step-4 checkpoint
    and resumed; killed inside the step-6 checkpoint (tensors written, state file not) and resumed."""
    ref, killed, crashed = tmp_path / "ref", tmp_path / "killed", tmp_path / "crashed"
    procs = {"ref": _popen(shards, ref), "killed": _popen(shards, killed, "--debug-step-delay", "0.4"),
             "crashed": _popen(shards, crashed, "--debug-crash-in-checkpoint", "6")}
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "0000004.json").exists():
        assert procs["killed"].poll() is None and time.time() < deadline, procs["killed"].communicate()[0]
        time.sleep(0.02)
    procs["killed"].send_signal(signal.SIGKILL)
    outs = {k: p.communicate(timeout=120)[0] for k, p in procs.items()}
    assert procs["ref"].returncode == 0, outs["ref"]
    assert procs["killed"].returncode == -signal.SIGKILL
    assert procs["crashed"].returncode == -signal.SIGKILL, outs["crashed"]
    assert max(list_checkpoints(str(killed / "checkpoints"))) in (4, 6)
    assert (crashed / "checkpoints" / "0000006.safetensors").exists()  # orphan tensors file, no state file
    assert list_checkpoints(str(crashed / "checkpoints")) == [2, 4]

    resumed = {k: _popen(shards, d, "--resume", "latest") for k, d in (("killed", killed), ("crashed", crashed))}
    for k, p in resumed.items():
        out = p.communicate(timeout=120)[0]
        assert p.returncode == 0, out
        assert "resumed from" in out
    _, want = load_checkpoint(str(ref / "checkpoints" / "0000014.json"))
    for d in (killed, crashed):
        meta, got = load_checkpoint(str(d / "checkpoints" / "0000014.json"))
        assert meta["epoch"] == 1 and meta["epoch_pos"] == 4
        assert set(got) == set(want)
        diff = [k for k in want if not torch.equal(got[k], want[k])]
        assert not diff, f"{d.name}: {len(diff)} tensors differ, e.g. {diff[:3]}"
        assert not [n for n in os.listdir(d / "checkpoints") if n.startswith(".tmp-")]


# =================================================================================================
#                               Corrupt images in extraction
# =================================================================================================
def test_extract_skips_corrupt_and_truncated_images(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    good = (root / "c0" / "0.jpg").read_bytes()
    (root / "c0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "c1" / "garbage.jpg").write_bytes(b"this is not an image")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(str(tmp_path / "vae"))
    extract.cli(["--data-path", str(root), "--out", str(tmp_path / "out"), "--vae", str(tmp_path / "vae"),
                 "--image-size", "16", "--shard-size", "4", "--batch-size", "3", "--num-workers", "0",
                 "--device", "cpu"])
    out = capsys.readouterr().out
    assert "skipping unreadable image" in out and "truncated.jpg" in out and "garbage.jpg" in out
    summary = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert summary["num_images"] == 6 and summary["skipped"] == 2
    ds = LatentShards(str(tmp_path / "out"))
    assert len(ds) == 12 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_log_line_peak_memory_note(monkeypatch):
    """meanflow-train's log line ends with the rank's peak allocated CUDA memory in GiB; nothing on CPU."""
    assert train.peak_memory_note(torch.device("cpu")) == ""
    seen = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: seen.append(device) or 3.5 * 2**30)
    assert train.peak_memory_note(torch.device("cuda", 1)) == " | peak mem 3.5 GiB"
    assert seen == [torch.device("cuda", 1)]


def test_train_accepts_a_vae_hub_id_and_names_a_bad_vae_path(shards, tmp_path, capsys):
    """--vae takes a hub id (owner/name) as well as a local folder; a path that is neither is named."""
    args = train.build_parser().parse_args(train_argv(shards, tmp_path, "--sample-every", "5",
                                                      "--vae", "stabilityai/sd-vae-ft-ema"))
    train.check_args(args)  # no network needed for the check
    err = cli_error(train.cli, train_argv(shards, tmp_path, "--sample-every", "5", "--vae",
                                          str(tmp_path / "no" / "vae")), capsys)
    assert "no such directory" in err and str(tmp_path / "no" / "vae") in err
