#!/usr/bin/env bash
# Installs Azurite (Microsoft's Azure Storage emulator, npm package `azurite`) once into a cache folder and prints
# the path of its `azurite-blob` command. Idempotent and fast on a second run (nothing is fetched when present);
# concurrent callers (pytest -n 2) wait on one lock. Needs node and npm (apt-get install -y nodejs npm).
#   bash scripts/azurite.sh            -> /root/.cache/hf_tensorizer/npm/node_modules/.bin/azurite-blob
# HF_TENSORIZER_NPM_PREFIX overrides the cache folder; AZURITE_VERSION the npm version spec (default 3).
set -euo pipefail
prefix=${HF_TENSORIZER_NPM_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_tensorizer/npm}
bin="$prefix/node_modules/.bin/azurite-blob"
if [ ! -x "$bin" ]; then
  command -v npm >/dev/null || { echo "scripts/azurite.sh: npm is not installed (apt-get install -y nodejs npm)" >&2; exit 3; }
  mkdir -p "$prefix"
  (
    flock 9
    if [ ! -x "$bin" ]; then
      npm install --prefix "$prefix" --no-audit --no-fund --no-save --loglevel=error "azurite@${AZURITE_VERSION:-3}" >&2
    fi
  ) 9>"$prefix/.install.lock"
fi
echo "$bin"
