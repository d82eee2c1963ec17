# Sourced by the GPU-machine scripts (run.sh, integrations.sh, sweep.sh): quiet Python, a log of everything
# under $OUT, timestamped steps, the wheels carried in .whl/, and the versions that matter.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

step() { echo "== [$(( $(date +%s) - T0 )) s] $*"; }

# start_log NAME DEFAULT_OUT: everything printed from here on also goes to $OUT/NAME
start_log() {
  OUT=${OUT:-$2}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/$1") 2>&1
}

# install_wheels WHAT_FAILS_WITHOUT: .whl/*.whl into /tmp/site (no network there), first on PYTHONPATH
install_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || echo "wheel install FAILED: $1"
  else
    echo "no .whl/ carried (run scripts/fetch_wheels.sh, carry .whl): $1"
  fi
  export PYTHONPATH=/tmp/site:$PWD  # our package runs from the working tree
}

# versions NAME...: the Python version and each distribution's version ("-" when missing)
versions() {
  timeout 60 python3 - "$@" <<'PY'
import importlib.metadata as md, sys
def v(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("python", sys.version.split()[0], *(f"{n} {v(n)}" for n in sys.argv[1:]))
PY
}
