#!/usr/bin/env bash
# lock-venv.sh VENV_DIR LOCK [UV_PIP_SYNC_OPTION...]: VENV_DIR holds exactly what LOCK lists.
#
# The one place that pins uv and syncs a venv from a lock: the Makefile's venv,
# scripts/engine/install.sh and scripts/nca/install.sh all call it. Hash-checked
# (`uv pip sync --require-hashes`). Idempotent: VENV_DIR/.stamp-<lock name> holds the sha256 of
# the lock, this script and the options; while all are unchanged a second run returns at once.
#
# Env: PYTHON3 (default python3) builds the venv; UV_CACHE_DIR as usual for uv.
set -euo pipefail

UV_VERSION=0.13.9
PYTHON3="${PYTHON3:-python3}"
# uv must use the machine's python3: no interpreter download is possible here anyway.
export UV_PYTHON_DOWNLOADS=never

if [ $# -lt 2 ]; then
	echo "usage: $0 VENV_DIR LOCK [UV_PIP_SYNC_OPTION...]" >&2
	exit 2
fi
venv="$1"
lock="$2"
shift 2
if [ ! -f "$lock" ]; then
	echo "$0: no lock file $lock" >&2
	exit 2
fi
stamp="$venv/.stamp-$(basename "$lock")"
python="$venv/bin/python"

want="$({ cat "$lock" "${BASH_SOURCE[0]}"; echo "$*"; } | sha256sum | cut -d' ' -f1)"
if [ -x "$python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
	echo "==> venv $venv is up to date with $lock"
	exit 0
fi

# `python3 -m uv` finds the binary pip installed, whether or not its bin dir is on PATH.
have="$("$PYTHON3" -m uv --version 2>/dev/null | cut -d' ' -f2)" || true
if [ "$have" != "$UV_VERSION" ]; then
	echo "installing uv $UV_VERSION for $PYTHON3 (found: ${have:-none})"
	"$PYTHON3" -m pip install --quiet --root-user-action=ignore "uv==$UV_VERSION"
fi
uv=("$PYTHON3" -m uv)

echo "==> venv $venv from $lock"
rm -f "$stamp"
[ -x "$python" ] || "${uv[@]}" venv --quiet --python "$PYTHON3" "$venv"
"${uv[@]}" pip sync --quiet --require-hashes "$@" --python "$python" "$lock"
echo "$want" >"$stamp"
