#!/usr/bin/env bash
# Installs Open MPI and libclang for muon-faer's `mpi` feature, which `--all-features` builds:
# rsmpi generates its bindings with bindgen (libclang) against the MPI headers (libopenmpi-dev),
# and tests/mpi.rs runs `mpirun` (openmpi-bin). Debian packages; idempotent and quiet, and does
# nothing when everything is there. Run by .ci/run, as root.
set -euo pipefail

have_mpi() {
    command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 \
        && compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null 2>&1
}

if have_mpi; then
    exit 0
fi
packages=(libopenmpi-dev openmpi-bin libclang-dev clang)
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-mpi: no apt-get; install ${packages[*]} (or your system's equivalents)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq "${packages[@]}"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "install-mpi: apt-get could not install ${packages[*]}" >&2
    exit 1
fi
have_mpi || { echo "install-mpi: installed, but mpirun, mpicc or libclang is still missing" >&2; exit 1; }
