#!/usr/bin/env bash
# install.sh VENV_DIR: network-config-analyzer's own venv from requirements-nca.lock.
#
# Hash-checked and idempotent (scripts/lock-venv.sh). tests/support/reachability.py runs it
# before each use of nca, into build/nca-venv unless NCA_VENV says otherwise.
# Env: PYTHON3 (default python3).
set -euo pipefail

if [ $# -ne 1 ]; then
	echo "usage: $0 VENV_DIR" >&2
	exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/../lock-venv.sh" "$1" "$(cd "$here/../.." && pwd)/requirements-nca.lock"
