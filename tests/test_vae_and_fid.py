"""--vae: hub ids against local directories, offline failures that come at once and say what to do;
meanflow-fid: the distance against an independent computation, the warning for too few images."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from meanflow_fast.imagenet.common import UsageError
from meanflow_fast.imagenet.vae import load_vae

MISSING_ID = "meanflow-fast-tests/no-such-vae"  # a hub id in no cache


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")  # imported before the clock starts: the import alone takes seconds


def _load_error(name):
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as e:
        load_vae(name, torch.device("cpu"))
    return str(e.value), time.perf_counter() - t0


def test_vae_hub_id_offline_fails_fast_saying_how_to_pass_a_directory(diffusers, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg, seconds = _load_error(MISSING_ID)
    assert "hub id" in msg and MISSING_ID in msg and "HF_HUB_OFFLINE" in msg, msg
    assert "local directory" in msg and "save_pretrained" in msg and "config.json" in msg, msg
    assert seconds < 5, f"took {seconds:.1f} s"


def test_vae_hub_unreachable_fails_fast_without_the_offline_flag(diffusers, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    huggingface_hub.close_session()  # a fresh client, without proxies read from the environment earlier
    msg, seconds = _load_error(MISSING_ID)
    assert "hub id" in msg and "cannot be reached" in msg and "save_pretrained" in msg, msg
    assert seconds < 5, f"took {seconds:.1f} s (huggingface_hub's retries take ~25 s)"


def test_vae_local_paths_name_the_path(diffusers, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-dir")
    msg, _ = _load_error(missing)
    assert missing in msg and "no such directory" in msg, msg
    monkeypatch.chdir(tmp_path)  # a bare name is a (relative) path, never a hub id
    msg, seconds = _load_error("sd-vae-ft-ema")
    assert "sd-vae-ft-ema: no such directory" in msg and seconds < 5, msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg, _ = _load_error(str(empty))
    assert str(empty) in msg and "no config.json" in msg, msg
    afile = tmp_path / "vae.safetensors"
    afile.write_bytes(b"")
    msg, _ = _load_error(str(afile))
    assert str(afile) in msg and "not a directory" in msg, msg


def test_extract_cli_reports_an_unreachable_hub_id_as_a_usage_error(diffusers, tmp_path, monkeypatch, capsys):
    from meanflow_fast.imagenet import extract
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "imgs" / "c0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "c0" / "a.png")
    with pytest.raises(SystemExit) as e:
        extract.cli(["--data-path", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--vae", MISSING_ID,
                     "--image-size", "8", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "hub id" in err and "save_pretrained" in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ FID
def frechet_from_features(f1, f2):
    """The Fréchet distance of the Gaussians fitted to f1 (n1, d) and f2 (n2, d), independent of
    meanflow_fast.metrics: with centred A, B, the nonzero eigenvalues of Σ1 Σ2 are the squared singular
    values of A Bᵀ / √((n1 − 1)(n2 − 1)), so tr((Σ1 Σ2)^½) is their sum — exact at any rank."""
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    c1, c2 = len(f1) - 1, len(f2) - 1
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (a ** 2).sum() / c1 + (b ** 2).sum() / c2 - 2 * tr_sqrt)


def random_fid_inception():
    """A random FID Inception whose features are of order 1 (torch's default init shrinks them layer by
    layer to ~1e-7, where every distance rounds to 0)."""
    from meanflow_fast.imagenet.inception import FIDInceptionV3
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval()


def test_fid_matches_an_independent_computation_and_warns_about_tiny_sets(tmp_path, capsys):
    from meanflow_fast.imagenet import fid as fid_cmd
    net = random_fid_inception()
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    ref = (rng.random((3, 16, 16, 3)) * 128).astype(np.uint8)  # darker: another distribution
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    fid = fid_cmd.cli([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                       str(weights), "--device", "cpu"])
    out = capsys.readouterr().out
    with torch.no_grad():
        feats = [net(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).double().numpy() for x in (samples, ref)]
    want = frechet_from_features(*feats)
    assert want > 1e-3 * np.abs(feats[0]).mean() ** 2  # a real distance, far from rounding noise
    assert fid == pytest.approx(want, rel=1e-6)
    # The result is still there, after one warning that names both sets and what is needed.
    assert out.count("too few images") == 1 and "samples 4" in out and "reference 3" in out, out
    assert "2048" in out and out.index("too few images") < out.index("FID ")
