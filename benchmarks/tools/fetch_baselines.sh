#!/usr/bin/env bash
# The attention benchmark's third-party baseline (issue 3: "≥ 2× faster than jvp_flash_attention 0.14") into
# the git-ignored .gpu_wheels/, on a machine with a package registry. The GPU machine has no network: carry
# .gpu_wheels there, and `bash benchmarks/tools/gpu_check.sh attention` installs it (--no-deps).
set -euo pipefail
mkdir -p .gpu_wheels
python -m pip download --no-deps "jvp_flash_attention==0.14.0" -d .gpu_wheels
ls -l .gpu_wheels
