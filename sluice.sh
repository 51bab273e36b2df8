#!/usr/bin/env bash
# Sets up .venv (once; again when pyproject.toml changes) with sluice installed, then runs:
#   ./sluice.sh demo [flags]     the embedded demo (tiny model, SFT warm start, GRPO)
#   ./sluice.sh test [args]      the test suite (pytest args pass through)
#   ./sluice.sh ARGS...          any other `sluice` command, e.g. ./sluice.sh train --config run.yaml
# torch: a torch >= 2.11 already importable by python3 (e.g. a CUDA build on a GPU machine) is kept,
# through --system-site-packages. Otherwise a CUDA build is installed where `nvidia-smi` finds a GPU,
# and the CPU build (no CUDA downloads) everywhere else.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv --system-site-packages "$venv"
fi
pip=("$venv/bin/python" -m pip -q --disable-pip-version-check)

if ! "$venv/bin/python" - <<'PY' 2>/dev/null; then
import sys, torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PY
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.11,<3"
  else
    "${pip[@]}" install --retries 1 --timeout 30 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
  fi
fi

stamp="$venv/.sluice-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "${pip[@]}" install -e "$root[dev]"
  touch "$stamp"
fi

cd "$root"
case "${1:-}" in
  "") exit 0 ;;
  test) shift; exec "$venv/bin/python" -m pytest "$@" ;;
  *) exec "$venv/bin/python" -m sluice.cli "$@" ;;
esac
