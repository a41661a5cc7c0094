#!/usr/bin/env bash
# Builds, once, a Debian sid chroot with nginx-light and its njs module (libnginx-mod-http-js),
# for running the gateway's config: its routing tier needs njs >= 0.8 (bookworm has 0.7.9,
# docs/reference/njs.md#versions) and its cluster upstreams use `server ... resolve`, which
# nginx has only since 1.27.3, while
# bookworm ships 1.22 and sid's nginx needs a newer libssl/libpcre2 than bookworm has
# (docs/reference/toolchain.md#nginx-resolve-offline). Idempotent: an existing, working chroot is reused.
set -euo pipefail

# Keep in step with components/render/nginx_conf.py NGINX_RESOLVE_MIN_VERSION (a test compares them).
MIN_VERSION=1.27.3
DIR="${NGINX_CHROOT:-/var/cache/qwen-vl/nginx-sid}"
MARKER=.qwen-vl-nginx-chroot

usage() {
    cat <<EOF
Usage: ${0##*/} [--help]

Builds a Debian sid (minbase) chroot with nginx-light >= ${MIN_VERSION} in
  ${DIR}
(set NGINX_CHROOT to use another directory). Reuses it when it already works.
The Debian mirror is the one apt already uses (/etc/apt/sources.list{,.d});
set NGINX_CHROOT_MIRROR to override it. Needs root and debootstrap (make debs).

Then check a config with:  chroot ${DIR} nginx -t -c CONF -p PREFIX
(CONF and PREFIX are paths inside the chroot).
EOF
}

say() { printf 'nginx-chroot: %s\n' "$*"; }
die() { printf 'nginx-chroot: error: %s\n' "$*" >&2; exit 1; }

# Prints "1.30.6" for a working chroot at $1, nothing otherwise.
chroot_version() {
    [ -x "$1/usr/sbin/nginx" ] || return 0
    chroot "$1" /usr/sbin/nginx -v 2>&1 | sed -n 's|^nginx version: nginx/\([0-9.]*\).*|\1|p'
}

# The snapshot mirrors apt may use serve Release files past their Valid-Until date.
APT_OPTS=(-o Acquire::Check-Valid-Until=false -qq)
PACKAGES=nginx-light,libnginx-mod-http-js
JS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so

# A chroot built before the router needed njs: add the module in place.
add_njs() {
    say "adding libnginx-mod-http-js to $1"
    chroot "$1" apt-get "${APT_OPTS[@]}" update || die "apt-get update failed in $1"
    DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get "${APT_OPTS[@]}" install -y libnginx-mod-http-js \
        || die "could not install libnginx-mod-http-js in $1"
}

new_enough() {
    [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$MIN_VERSION" "$1" | sort -V | head -n 1)" = "$MIN_VERSION" ]
}

# The first non-security Debian archive URI in apt's sources (deb822 or one-line format).
apt_mirror() {
    local files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] && files+=("$f")
    done
    [ "${#files[@]}" -gt 0 ] || return 0
    awk '
        /^[[:space:]]*#/ { next }
        /^URIs:/ { for (i = 2; i <= NF; i++) print $i; next }
        /^deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }
    ' "${files[@]}" | grep -v -- '-security' | head -n 1
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; die "unknown argument: $1" ;;
esac

have="$(chroot_version "$DIR" 2>/dev/null || true)"
if new_enough "$have" && [ -e "$DIR$JS_MODULE" ]; then
    say "ready: $DIR (nginx $have, njs)"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap and chroot); run it as root or with sudo"
command -v debootstrap >/dev/null || die "debootstrap is not installed; run 'make debs'"
[ ! -e "$DIR" ] || [ -d "$DIR" ] || die "$DIR exists and is not a directory; remove it or set NGINX_CHROOT"
if [ -e "$DIR" ] && [ ! -e "$DIR/$MARKER" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    die "$DIR exists, is not empty and was not built by this script; remove it or set NGINX_CHROOT"
fi

mirror="${NGINX_CHROOT_MIRROR:-$(apt_mirror)}"
[ -n "$mirror" ] || die "no Debian mirror found in apt's sources; set NGINX_CHROOT_MIRROR"

mkdir -p "$(dirname "$DIR")"
# One builder at a time (make and a pytest fixture may both ask for it).
exec 9>"$DIR.lock"
flock 9
have="$(chroot_version "$DIR" 2>/dev/null || true)"
if new_enough "$have" && [ -e "$DIR/$MARKER" ]; then
    [ -e "$DIR$JS_MODULE" ] || add_njs "$DIR"
    say "ready: $DIR (nginx $have, njs)"
    exit 0
fi

partial="$DIR.partial"
rm -rf -- "$partial"
trap 'rm -rf -- "$partial"' EXIT
say "building a sid minbase chroot with nginx-light in $DIR from $mirror (about 25 s, 230 MB)"
started=$SECONDS
# Per-package lines (hundreds) are dropped; stage lines, warnings and errors are kept.
set +e
debootstrap --variant=minbase --include=$PACKAGES sid "$partial" "$mirror" 2>&1 \
    | grep --line-buffered -v -E '^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) [a-z0-9]'
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || die "debootstrap failed (exit $rc); see its output above"
built="$(chroot_version "$partial" 2>/dev/null || true)"
[ -n "$built" ] || die "debootstrap did not produce a working nginx (see the output above)"
new_enough "$built" || die "sid's nginx is $built, older than $MIN_VERSION"
[ -e "$partial$JS_MODULE" ] || die "debootstrap did not install the njs module ($JS_MODULE)"
touch "$partial/$MARKER"
rm -rf -- "$DIR"
mv -- "$partial" "$DIR"
trap - EXIT
say "ready: $DIR (nginx $built, built in $((SECONDS - started)) s)"
