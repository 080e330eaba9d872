"""Atomic file writes: a crash or a kill mid-write never leaves a truncated file under the final name.

Every writer goes through ``atomic_write``: write to a temporary file in the target's folder, fsync it,
rename it onto the final name (atomic on POSIX), fsync the folder. A reader therefore sees the old file
or the new one, never half of one; a killed writer leaves at most a ``.tmp-*`` file behind, which
``remove_stale_tmp`` cleans up. The file gets the mode a plain ``open()`` would give it (0o666 minus the
umask, or the folder's default ACL), not ``tempfile.mkstemp``'s 0o600.
"""
import glob
import json
import os
import secrets
import stat
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

__all__ = ["atomic_write", "save_safetensors", "save_json", "load_json", "save_npz", "remove_stale_tmp",
           "TMP_PREFIX"]

TMP_PREFIX = ".tmp-"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the file, then rename it onto ``path`` (atomic on POSIX)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path must be a non-empty str or os.PathLike, got {path!r}")
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path must name a file, but {path} is a directory")
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp, mode = _new_tmp_file(d, os.path.basename(path))
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            # The writer replaced the file (renamed a file of its own, e.g. a 0o600 temp file, onto it).
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _new_tmp_file(folder: str, name: str) -> Tuple[str, int]:
    """Create an empty, new ``.tmp-<name>.<random>`` file in ``folder``; returns its path and mode."""
    for _ in range(100):
        tmp = os.path.join(folder, f"{TMP_PREFIX}{name}.{secrets.token_hex(4)}")
        try:
            # Mode 0o666 as open() asks: the kernel applies the umask (or a default ACL) at creation, so
            # no os.umask set-and-restore, which would race with files other threads create meanwhile.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"could not create a new temporary file for {name} in {folder}")


# safetensors' dtype names (its format's header field "dtype").
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str] = None) -> None:
    """``tensors`` as a safetensors file, through ``atomic_write``, written tensor by tensor.

    The format is an 8-byte little-endian header length, a JSON header (name → dtype, shape, byte range;
    ``__metadata__`` → str → str), then the raw bytes. We write it ourselves because safetensors'
    ``save_file`` writes through a temp file of its own (``.tmpXXXXXX``, which a kill would leave where
    ``remove_stale_tmp`` does not look) and its in-memory ``save`` would hold a second copy of a
    checkpoint on the host. Reading stays with the safetensors library.
    """
    for name, v in tensors.items():
        if v.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"save_safetensors: tensor {name!r} has dtype {v.dtype}; allowed: "
                             f"{', '.join(str(d) for d in _SAFETENSORS_DTYPES)}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("save_safetensors: metadata must map str to str")
    header, offset = {}, 0
    for name in sorted(tensors):
        v = tensors[name]
        size = v.numel() * v.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[v.dtype], "shape": list(v.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned (spaces are valid JSON padding)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for name in sorted(tensors):  # one tensor's host copy at a time
                v = tensors[name].detach().to("cpu", copy=False).contiguous()
                if v.numel():
                    f.write(v.reshape(-1).view(torch.uint8).numpy().data)
    atomic_write(path, write)


def save_json(obj, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def load_json(path: str, what: str = "JSON file"):
    """Read a JSON file; a missing or malformed file raises an error that names the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is malformed (not valid JSON: {e})") from e


def save_npz(path: str, **arrays: np.ndarray) -> None:
    """``np.savez`` through ``atomic_write`` (written through a file object, so no '.npz' is appended)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def remove_stale_tmp(folder: str, pattern: Optional[str] = None) -> int:
    """Delete the ``.tmp-*`` files a killed writer left in ``folder``; returns how many."""
    n = 0
    for p in glob.glob(os.path.join(folder, TMP_PREFIX + (pattern or "*"))):
        try:
            os.remove(p)
            n += 1
        except FileNotFoundError:
            pass
    return n
