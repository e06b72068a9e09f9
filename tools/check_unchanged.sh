#!/usr/bin/env bash
# Usage: tools/check_unchanged.sh DIR "COMMAND" — runs COMMAND and fails if it changed any file under DIR.
# Used by `make test` for "notebooks are clean" (nbdev_clean) and "library matches notebooks" (nbdev_export).
set -euo pipefail
dir=$1; shift
snap() { find "$dir" -type f \( -name '*.py' -o -name '*.ipynb' \) -not -path '*/.ipynb_checkpoints/*' -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; }
before=$(snap)
bash -c "$*"
after=$(snap)
if [ "$before" != "$after" ]; then
  echo "FAIL: '$*' changed files under $dir:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  echo "Run it yourself and commit the result (notebooks are the source; see README)." >&2
  exit 1
fi
echo "ok: '$*' left $dir unchanged"
