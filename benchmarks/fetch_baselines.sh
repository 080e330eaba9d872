#!/usr/bin/env bash
# Download the third-party baseline of the attention benchmark (issue 3: "≥ 2× faster than
# jvp_flash_attention 0.14") into .gpu_wheels/ (git-ignored, never committed), on a machine with a package
# registry. The GPU machine has no network: pass .gpu_wheels in the device call's carry list, and
# `bash benchmarks/gpu_check.sh attention` installs it there (--no-deps: it needs only torch and triton).
set -euo pipefail
mkdir -p .gpu_wheels
python -m pip download --no-deps "jvp_flash_attention==0.14.0" -d .gpu_wheels
ls -l .gpu_wheels
