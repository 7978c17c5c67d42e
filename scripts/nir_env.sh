#!/usr/bin/env bash
# Build (or reuse) a light environment in which another framework's own NIR import reads tmkt's
# NIR exports, when its pins conflict with the main env.
#
#   bash scripts/nir_env.sh FRAMEWORK [ENV_DIR]     FRAMEWORK: sinabs
#                                                   default ENV_DIR: ~/.cache/tmkt/nir-FRAMEWORK
#
# sinabs 3.1.3 pins nir <= 1.0.4 (the main env has nir 1.0.8 for norse and snntorch, which read
# tmkt's files there). torch 2.13.0 is named on the same pip line so pip takes the CPU build.
# Idempotent: a stamp file names the installed set; a rerun with the same set does nothing.
set -euo pipefail

FRAMEWORK="${1:?usage: nir_env.sh sinabs [ENV_DIR]}"
ENV_DIR="${2:-$HOME/.cache/tmkt/nir-$FRAMEWORK}"
case "$FRAMEWORK" in
    sinabs) SPEC="torch==2.13.0 sinabs==3.1.3 nir==1.0.4 h5py<4"; CHECK="import sinabs, nir, h5py" ;;
    *) echo "nir_env.sh: unknown framework $FRAMEWORK (sinabs)" >&2; exit 2 ;;
esac
STAMP="$ENV_DIR/.tmkt-nir-stamp"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SPEC" ] && "$ENV_DIR/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "$FRAMEWORK env ready: $ENV_DIR (reused)"
    exit 0
fi

start=$(date +%s)
PY="${PYTHON:-python3}"
rm -rf "$ENV_DIR"
mkdir -p "$(dirname "$ENV_DIR")"
"$PY" -m venv "$ENV_DIR"
# shellcheck disable=SC2086
"$ENV_DIR/bin/python" -m pip install -q --disable-pip-version-check $SPEC
"$ENV_DIR/bin/python" -c "$CHECK; print('$FRAMEWORK', $FRAMEWORK.__version__, 'nir', nir.__version__ if hasattr(nir, '__version__') else '?')"
echo "$SPEC" > "$STAMP"
echo "$FRAMEWORK env built: $ENV_DIR in $(( $(date +%s) - start )) s, $(du -sh "$ENV_DIR" | cut -f1)"
