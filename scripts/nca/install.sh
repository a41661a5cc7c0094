#!/usr/bin/env bash
# install.sh VENV_DIR: network-config-analyzer's own venv from requirements-nca.lock.
#
# Hash-checked (`uv pip sync --require-hashes`). Idempotent: VENV_DIR/.stamp-nca-lock holds the
# sha256 of the lock and of this script; while both are unchanged a second run returns at once.
# Used by tests/artifacts/test_network_policies.py (it runs this script itself, into
# build/nca-venv unless NCA_VENV says otherwise). Env: PYTHON3 (default python3).
set -euo pipefail

UV_VERSION=0.13.9
PYTHON3="${PYTHON3:-python3}"
export UV_PYTHON_DOWNLOADS=never

if [ $# -ne 1 ]; then
	echo "usage: $0 VENV_DIR" >&2
	exit 2
fi
venv="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lock="$here/../../requirements-nca.lock"
stamp="$venv/.stamp-nca-lock"
python="$venv/bin/python"

want="$(cat "$lock" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ -x "$python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
	exit 0
fi

have="$("$PYTHON3" -m uv --version 2>/dev/null | cut -d' ' -f2)" || true
if [ "$have" != "$UV_VERSION" ]; then
	echo "installing uv $UV_VERSION for $PYTHON3 (found: ${have:-none})"
	"$PYTHON3" -m pip install --quiet --root-user-action=ignore "uv==$UV_VERSION"
fi
uv=("$PYTHON3" -m uv)

echo "==> nca venv $venv from requirements-nca.lock"
rm -f "$stamp"
[ -x "$python" ] || "${uv[@]}" venv --quiet --python "$PYTHON3" "$venv"
"${uv[@]}" pip sync --quiet --require-hashes --python "$python" "$lock"
"$venv/bin/nca" --version
echo "$want" >"$stamp"
