#!/bin/sh
# Runs the Debian sid chroot's nginx (1.30 with njs, see scripts/nginx-chroot.sh) on this
# host's files: the gateway's routing tier needs njs >= 0.8 (shared dictionaries), which
# bookworm's 0.7.9 lacks (docs/reference/njs.md#versions).
#
#   sid-nginx.sh [--user USER:GROUP] DIR... -- nginx ARGUMENTS
#
# Each DIR (an absolute directory such as /tmp) is bind-mounted at the same path inside the
# chroot, in a private mount namespace, so the host's paths in nginx.conf hold; so are /proc
# (/dev/stdout, the access log of the pod's config, points into it), /etc/hosts and
# /etc/resolv.conf (the rehearsal's names). The last step execs
# the command, so the caller's PID is nginx's master (stop it by that PID).
set -eu
CHROOT="${NGINX_CHROOT:-/var/cache/qwen-vl/nginx-sid}"
usage() { echo "sid-nginx: error: usage: sid-nginx.sh [--user U:G] DIR... -- nginx ARGS" >&2; exit 2; }
user=""
if [ "${1:-}" = "--user" ]; then
    [ "$#" -ge 2 ] || usage
    user="$2"; shift 2
fi
dirs=""
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        /*) dirs="$dirs $1" ;;
        *) echo "sid-nginx: error: $1 is not an absolute directory" >&2; exit 2 ;;
    esac
    shift
done
[ "${1:-}" = "--" ] || usage
shift
[ -x "$CHROOT/usr/sbin/nginx" ] || { echo "sid-nginx: error: no nginx in $CHROOT; run make nginx-chroot" >&2; exit 1; }
[ -e "$CHROOT/usr/lib/nginx/modules/ngx_http_js_module.so" ] || {
    echo "sid-nginx: error: no njs module in $CHROOT; run make nginx-chroot" >&2; exit 1; }
# shellcheck disable=SC2016 # single quotes on purpose: the inner sh expands its own $1, $@
exec unshare --mount --propagation private sh -c '
    set -eu
    chroot_dir=$1; user=$2; dirs=$3; shift 3
    mount -t proc proc "$chroot_dir/proc"
    # Names as this host (or `ip netns exec`, which binds /etc/netns/<ns>/hosts) resolves them.
    for f in /etc/hosts /etc/resolv.conf; do
        [ -e "$f" ] || continue
        [ -e "$chroot_dir$f" ] || : > "$chroot_dir$f"
        mount --bind "$f" "$chroot_dir$f"
    done
    for d in $dirs; do
        mkdir -p "$chroot_dir$d"
        mount --bind "$d" "$chroot_dir$d"
    done
    # The chroot'"'"'s own PATH: the caller'"'"'s may name host directories that /tmp now shows.
    path=/usr/sbin:/usr/bin:/sbin:/bin
    if [ -n "$user" ]; then exec chroot --userspec="$user" "$chroot_dir" env PATH=$path "$@"; fi
    exec chroot "$chroot_dir" env PATH=$path "$@"
' sid-nginx "$CHROOT" "$user" "$dirs" "$@"
