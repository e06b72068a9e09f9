#!/usr/bin/env bash
# Creates .venv and installs everything mvsnb needs, in one pip command (torch pinned in it, so pip
# takes the CPU wheel instead of the multi-GB CUDA build). Idempotent: a stamp file skips the work
# when requirements.txt, settings.ini and setup.py have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.mvsnb-installed"
want=$(cat requirements.txt settings.ini setup.py | sha256sum | cut -d' ' -f1)

# Open3D's wheel links libusb-1.0 at import time.
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing libusb-1.0-0 (needed by 'import open3d')"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0) >/dev/null
  else
    echo "[setup] WARNING: libusb-1.0-0 is missing and this user cannot apt-get it; 'import open3d' will fail." >&2
    echo "[setup]          ask an admin for: sudo apt-get install libusb-1.0-0" >&2
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
echo "[setup] installing pinned requirements (one pip command; ~2 GB on first run)"
if [ -n "${MVSNB_KEEP_TORCH:-}" ]; then
  # GPU users: install the CUDA torch matching your driver into .venv first, then run with MVSNB_KEEP_TORCH=1.
  grep -v '^torch==' requirements.txt > "$VENV/requirements-notorch.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/requirements-notorch.txt"
else
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"
