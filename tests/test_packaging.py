"""What ``pip install`` puts on the import path: one package, ``meanflow_fast``, its kernels inside it.

A top-level ``kernels`` would shadow (or be shadowed by) Hugging Face's ``kernels`` package, which shares
the import name and is installed beside transformers in many environments."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run outside the repository, so that the checkout's folders are not on sys.path by accident: only what
# the installed distribution provides can be imported.
_PROBE = r"""
import importlib.metadata, importlib.util, json
dist = importlib.metadata.distribution("meanflow-fast")
top = (dist.read_text("top_level.txt") or "").split()
bare = importlib.util.find_spec("kernels")
import meanflow_fast.kernels
print(json.dumps({"top_level": top, "bare_kernels_origin": bare and bare.origin,
                  "kernels_file": meanflow_fast.kernels.__file__}))
"""


def test_installed_distribution_provides_only_meanflow_fast(tmp_path):
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["top_level"] == ["meanflow_fast"], found
    origin = found["bare_kernels_origin"]
    # Another distribution's ``kernels`` (Hugging Face's) may be installed; ours must not be one.
    assert origin is None or ROOT not in Path(origin).resolve().parents, origin
    assert Path(found["kernels_file"]).resolve().parent == ROOT / "meanflow_fast" / "kernels"


def test_setup_declares_no_top_level_kernels():
    setup_py = (ROOT / "setup.py").read_text()
    assert '"kernels"' not in setup_py and "'kernels'" not in setup_py
    assert not (ROOT / "kernels").exists(), "the kernels live in meanflow_fast/kernels/"
