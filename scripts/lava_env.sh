#!/usr/bin/env bash
# Build (or reuse) the Python 3.10 environment in which lava-dl's netx reads our HDF5 exports.
#
#   bash scripts/lava_env.sh [ENV_DIR]      default ENV_DIR: ~/.cache/tmkt/lava-env
#
# Light route, no torch: lava-nc 0.10.0 with its own (small) dependencies, lava-dl 0.6.0 with
# --no-deps plus h5py. lava-dl's hard dependency on torch 2.3 (~5.6 GB with CUDA libraries)
# only serves slayer (training) and netx.sequential_modules; scripts/lava_run.py loads
# netx.hdf5 without them (see docs/loihi.md, "The lava environment").
# Idempotent: a stamp file names the installed set; a rerun with the same set does nothing.
set -euo pipefail

ENV_DIR="${1:-$HOME/.cache/tmkt/lava-env}"
SPEC="lava-nc==0.10.0 lava-dl==0.6.0 h5py<4 numpy<2 scipy<2"
STAMP="$ENV_DIR/.tmkt-lava-stamp"

find_python() {
    local root
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root)"
        if [ -x "$root/versions/3.10.13/bin/python3" ]; then echo "$root/versions/3.10.13/bin/python3"; return; fi
        for p in "$root"/versions/3.10.*/bin/python3; do [ -x "$p" ] && { echo "$p"; return; }; done
    fi
    command -v python3.10 && return
    echo "lava_env.sh: no Python 3.10 found (pyenv 3.10.x or python3.10 on PATH)" >&2
    return 1
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SPEC" ] && "$ENV_DIR/bin/python" -c "import lava.magma, h5py" 2>/dev/null; then
    echo "lava env ready: $ENV_DIR (reused)"
    exit 0
fi

start=$(date +%s)
PY="$(find_python)"
rm -rf "$ENV_DIR"
mkdir -p "$(dirname "$ENV_DIR")"
"$PY" -m venv "$ENV_DIR"
PIP=("$ENV_DIR/bin/python" -m pip install -q --disable-pip-version-check)
# lava-nc's dependencies are light (numpy<2, scipy, networkx, asteval, scikit-learn).
"${PIP[@]}" "lava-nc==0.10.0" "h5py>=3.7,<4" "numpy<2" "scipy<2"
# lava-dl without its dependencies: torch, torchvision, opencv, ... are not needed by netx.hdf5.
"${PIP[@]}" --no-deps "lava-dl==0.6.0"
"$ENV_DIR/bin/python" -c "import lava.magma, lava.proc.lif.models, h5py, numpy; print('numpy', numpy.__version__)"
echo "$SPEC" > "$STAMP"
echo "lava env built: $ENV_DIR in $(( $(date +%s) - start )) s, $(du -sh "$ENV_DIR" | cut -f1)"
