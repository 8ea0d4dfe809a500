#!/usr/bin/env bash
# Installs NVRTC (for muon-cuda's kernel-compile test) from the PyPI wheel
# `nvidia-cuda-nvrtc-cu12`: no CUDA toolkit, no GPU. Idempotent and quiet; run by .ci/run.
#
# A failed install only warns: the kernel-compile test then fails under CI=true with a message
# naming what is missing, which is clearer than aborting CI here.
set -uo pipefail

have_nvrtc() {
    python3 - <<'PY' 2>/dev/null
import glob, os, sys
import nvidia.cuda_nvrtc as m
lib = os.path.join(list(m.__path__)[0], "lib")
sys.exit(0 if glob.glob(os.path.join(lib, "libnvrtc.so*")) else 1)
PY
}

if ! command -v python3 >/dev/null 2>&1; then
    echo "install-nvrtc: warning: no python3; muon-cuda's kernel-compile test will not find NVRTC" >&2
    exit 0
fi
if have_nvrtc; then
    exit 0
fi
if ! python3 -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvrtc-cu12 2>/dev/null \
    && ! python3 -m pip install --quiet --disable-pip-version-check --user nvidia-cuda-nvrtc-cu12; then
    echo "install-nvrtc: warning: pip could not install nvidia-cuda-nvrtc-cu12" >&2
    exit 0
fi
have_nvrtc || echo "install-nvrtc: warning: nvidia-cuda-nvrtc-cu12 installed but libnvrtc.so not found" >&2
exit 0
