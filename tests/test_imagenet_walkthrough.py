"""docs/IMAGENET.md, "CPU walkthrough (minutes, no downloads)", runs as written: its fenced blocks in order
in an empty folder, each python block saved under the file name on its first line and run with this
interpreter, each bash block run by bash with the console scripts installed next to it (``meanflow-extract``
…) on PATH, with the hub offline and any HTTP(S) request sent to a closed port; after each step the files it
writes are checked. The Inception weights' download is not run: a randomly initialised FID Inception saved
under the weights file's name lets the FID command run as written (its number is not an FID).

Time: about 35 s on 2 idle CPU cores, 50–65 s while other work shares them (most of it the start-up of
six Python processes importing torch).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from meanflow_fast.imagenet.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from tests.helpers import fenced_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "IMAGENET.md"
HEADING = "## CPU walkthrough (minutes, no downloads)"
SKIP_MARK = "<!-- walkthrough: not run by the test"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
# The section's blocks in order: (language, a string that identifies the step, run by the test).
STEPS = [
    ("python", "# make_images.py", True),
    ("python", "# make_vae.py", True),
    ("bash", "meanflow-extract ", True),
    ("bash", "meanflow-train ", True),
    ("bash", "meanflow-sample ", True),
    ("bash", WEIGHTS_URL, False),
    ("bash", "meanflow-fid ", True),
]
N_CLASSES, PER_CLASS, SIZE = 3, 8, 32  # what make_images.py writes (the prose says so too)
N = N_CLASSES * PER_CLASS


def section_blocks():
    text = DOC.read_text(encoding="utf-8")
    assert text.count(HEADING + "\n") == 1, f"docs/IMAGENET.md has no section {HEADING!r}"
    body = text.split(HEADING + "\n", 1)[1]
    body = re.split(r"^## ", body, maxsplit=1, flags=re.M)[0]  # up to the next section
    return fenced_blocks(body)


def test_walkthrough_section_has_its_blocks():
    blocks = section_blocks()
    found = [(b.lang, b.code.splitlines()[0] if b.code else "") for b in blocks]
    assert len(blocks) == len(STEPS), f"expected {len(STEPS)} blocks in {HEADING!r}, found {found}"
    for b, (lang, key, runs) in zip(blocks, STEPS):
        assert b.lang == lang and key in b.code, f"expected a {lang} block with {key!r}, found {b.lang}: {b.code}"
        assert (SKIP_MARK not in b.before) == runs, f"only the download is marked as not run: {b.code}"
        if lang == "python":
            assert re.match(r"# \w+\.py:", b.code), f"a python block's first line names its file: {b.code[:60]}"
    # The download writes the file that meanflow-fid reads.
    curl, fid = blocks[5].code, blocks[6].code
    name = re.search(r"-o (\S+)", curl)[1]
    assert curl.rstrip().endswith(WEIGHTS_URL + name), f"the download should write {name}: {curl}"
    assert f"--inception-weights {name} " in fid, f"meanflow-fid should read the downloaded {name}: {fid}"


def _env(bin_dir):
    """The user's shell: the console scripts on PATH, this checkout imported, nothing from the network."""
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[var] = "http://127.0.0.1:9"  # the discard port: nothing listens, any request fails at once
    for var in ("NO_PROXY", "no_proxy", "TRITON_INTERPRET", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return env


def run_block(block, cwd, env):
    """Run one block as the walkthrough says; return its stdout + stderr."""
    if block.lang == "python":
        name = re.match(r"# (\w+\.py)", block.code)[1]
        (cwd / name).write_text(block.code, encoding="utf-8")
        cmd = [sys.executable, name]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"exit status {p.returncode} from\n{block.code}\n{out[-4000:]}"
    return out


# =================================================================================================
#                                  What each step writes
# =================================================================================================
def check_images(d, out):
    classes = sorted(p.name for p in (d / "images").iterdir())
    assert classes == [f"class{c}" for c in range(N_CLASSES)]
    pngs = []
    for c in classes:
        files = sorted((d / "images" / c).iterdir())
        assert [f.name for f in files] == [f"{i}.png" for i in range(PER_CLASS)]
        for f in files:
            with Image.open(f) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
                pngs.append(np.asarray(im))
    with np.load(d / "images.npz") as z:
        assert z.files == ["arr_0"]
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, SIZE, SIZE, 3)
    np.testing.assert_array_equal(arr, np.stack(pngs))  # the same images, in label order
    # Synthetic, not blank: each class has its own dominant colour channel.
    means = arr.reshape(N_CLASSES, PER_CLASS * SIZE * SIZE, 3).mean(1)
    assert means.argmax(1).tolist() == [0, 1, 2] and arr.std() > 20


def check_vae(d, out):
    config = json.loads((d / "tiny-vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
    assert len(config["down_block_types"]) == 3  # factor 4: 32 px → 8×8 latents
    assert (d / "tiny-vae" / "diffusion_pytorch_model.safetensors").stat().st_size > 10_000


def check_extract(d, out):
    from safetensors.numpy import load_file
    summary = json.loads((d / "latents" / "dataset.json").read_text())
    assert summary["num_images"] == N and summary["skipped"] == 0 and summary["num_shards"] == 1
    assert summary["classes"] == [f"class{c}" for c in range(N_CLASSES)] and summary["latent_shape"] == [4, 8, 8]
    assert sorted(p.name for p in (d / "latents").glob("shard-*")) == ["shard-00000.safetensors"]
    shard = load_file(str(d / "latents" / "shard-00000.safetensors"))
    for key in ("latents", "latents_flip"):
        assert shard[key].dtype == np.float32 and shard[key].shape == (N, 4, 8, 8)
        assert np.isfinite(shard[key]).all() and shard[key].std() > 0
    assert not np.array_equal(shard["latents"], shard["latents_flip"])
    assert shard["labels"].dtype == np.int64
    assert shard["labels"].tolist() == [c for c in range(N_CLASSES) for _ in range(PER_CLASS)]


def check_train(d, out):
    run = d / "run"
    assert list_checkpoints(str(run / "checkpoints")) == [50, 100]
    meta, tensors = load_checkpoint(str(run / "checkpoints" / "0000100.json"))
    assert meta["step"] == 100 and meta["world_size"] == 1
    assert meta["args"]["lr"] == 1e-3 and meta["args"]["ema_decay"] == 0.99 and meta["args"]["depth"] == 2
    assert meta["model_config"]["input_size"] == 8 and meta["model_config"]["num_classes"] == N_CLASSES
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    log = (run / "log.txt").read_text()
    assert "done: 100 steps, 0 skipped" in log
    raw = [float(x) for x in re.findall(r"raw loss ([\d.]+)", log)]
    assert len(raw) == 4 and raw[-1] < raw[0] / 4, f"the raw loss should fall (the doc says so): {raw}"
    for step in (50, 100):
        with Image.open(run / "samples" / f"{step:07d}.png") as im:
            assert im.size[0] > 2 * SIZE and im.size[1] >= SIZE  # a grid of decoded 32 px images


def check_sample(d, out):
    with np.load(d / "samples.npz") as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (N, SIZE, SIZE, 3)
    assert labels.tolist() == [i % N_CLASSES for i in range(N)]
    assert arr.std() > 1 and len({a.tobytes() for a in arr}) == N  # 24 different images, not a constant


def check_fid(d, out):
    result = json.loads((d / "fid.json").read_text())
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert result["num_samples"] == N and result["samples"] == "samples.npz" and result["ref"] == "images.npz"
    assert out.count("too few images") == 1 and f"FID {result['fid']:.4f}" in out


CHECKS = [check_images, check_vae, check_extract, check_train, check_sample, None, check_fid]


def test_walkthrough_runs_as_written(tmp_path):
    from tests.test_vae_and_fid import random_fid_inception
    blocks = section_blocks()
    assert len(blocks) == len(STEPS) == len(CHECKS)  # the block list itself: the test above
    bin_dir = os.path.dirname(sys.executable)
    for name in ("meanflow-extract", "meanflow-train", "meanflow-sample", "meanflow-fid"):
        assert shutil.which(name, path=bin_dir), f"{name} is not installed in {bin_dir} (pip install -e '.[dev]')"
    env = _env(bin_dir)
    times = []
    for block, (_, key, runs), check in zip(blocks, STEPS, CHECKS):
        if not runs:
            # In place of the download: a random FID Inception under the file name the download writes.
            name = re.search(r"-o (\S+)", block.code)[1]
            torch.save(random_fid_inception().state_dict(), tmp_path / name)
            continue
        t0 = time.perf_counter()
        out = run_block(block, tmp_path, env)
        times.append(f"{key.strip('# ')} {time.perf_counter() - t0:.1f} s")
        check(tmp_path, out)
    print("walkthrough steps:", ", ".join(times))
