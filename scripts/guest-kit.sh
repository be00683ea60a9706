#!/usr/bin/env bash
# Build the guest-boot kit: what tests need to boot a tiny Linux guest under TCG
# on a blkrep export. Debian 12 (bookworm) packages, fetched with
# `apt-get download` and unpacked (never installed).
#
# Usage: scripts/guest-kit.sh [--force] [--help]
#
#   --force   rebuild even if the kit is complete (downloaded .debs are reused)
#
# The kit goes to $BLKREP_GUEST_KIT, or target/guest-kit of the repository:
#   bin/qemu-system-x86_64   wrapper running Debian 12's QEMU 7.2 from the kit
#                            (its libraries, modules and firmware)
#   vmlinuz                  Debian 12's kernel
#   initramfs.img            busybox, the virtio-blk, virtio-console and ext4
#                            modules, qemu-guest-agent with its libraries, and
#                            tests/guest/init as /init
#   kernel-release           the kernel's release (uname -r)
#   debs/                    the downloaded packages (a cache)
# The last line on stdout is `guest-kit: DIR`; progress goes to stderr.
#
# Idempotent: a stamp keyed on this script and tests/guest/init makes a second
# run return at once; concurrent runs wait on a lock. Installs nothing but
# e2fsprogs (the tests format and check images on the host) when it is missing,
# and runs `apt-get update` only when a package cannot be found or fetched.
# Works as root; uses sudo for those two steps when not root.
#
# Why not `apt-get install qemu-system-x86`: these machines carry qemu-utils 10
# from backports, beside which Debian 12's QEMU 7.2 system packages cannot be
# installed; unpacked into the kit they touch nothing of the host's.
set -euo pipefail

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help)
            sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
            exit 0 ;;
        *) echo "guest-kit: unknown option: $arg (try --help)" >&2; exit 2 ;;
    esac
done

# e2fsprogs live in /usr/sbin, which a user's PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

log() { echo "guest-kit: $*" >&2; }
die() { log "error: $*"; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
kit=${BLKREP_GUEST_KIT:-$repo/target/guest-kit}
init_src=$repo/tests/guest/init
arch=x86_64-linux-gnu

[[ -f "$init_src" ]] || die "$init_src is missing"
for tool in apt-get apt-cache dpkg-deb dpkg-query flock sha256sum gzip tar; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found: this script expects Debian 12"
done

# Runs "$@" as root: directly, or through sudo.
as_root() {
    if (( EUID == 0 )); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "not root and sudo is not installed; run as root: $*"
    fi
}

mkdir -p "$kit"
kit=$(cd "$kit" && pwd)
exec 9>"$kit.lock"
flock 9

# Keyed on the build recipe: a changed script or init rebuilds the kit.
key=$(cat "${BASH_SOURCE[0]}" "$init_src" | sha256sum | cut -d' ' -f1)
complete() {
    [[ -f "$kit/stamp" && "$(cat "$kit/stamp")" == "$key" ]] &&
        [[ -x "$kit/bin/qemu-system-x86_64" && -f "$kit/vmlinuz" && -f "$kit/initramfs.img" ]]
}

apt_update() {
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
        die "apt-get update failed"
}

ensure_host_tools() {
    local missing=()
    command -v mkfs.ext4 >/dev/null 2>&1 && command -v e2fsck >/dev/null 2>&1 &&
        command -v debugfs >/dev/null 2>&1 || missing+=(e2fsprogs)
    (( ${#missing[@]} == 0 )) && return 0
    apt_update
    log "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        die "cannot install ${missing[*]}"
}

ensure_host_tools
if (( ! force )) && complete; then
    log "kit complete ($kit)"
    echo "guest-kit: $kit"
    exit 0
fi

debs=$kit/debs
work=$kit/work
mkdir -p "$debs"
# Start from nothing but the download cache.
find "$kit" -mindepth 1 -maxdepth 1 ! -name debs -exec rm -rf {} +
mkdir -p "$work"

installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

# The alternatives of each Depends/Pre-Depends of the packages given, one group
# per line after the name of the package that has it; a virtual package is
# replaced by the packages providing it. One apt-cache call for all of them:
# each call costs a second where apt keeps no binary cache.
dep_groups() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$@" | awk '
        function flush() { if (ended && group != "") print pkg group; group = ""; ended = 0 }
        /^ [ |](Pre)?Depends: / {
            flush()
            if ($2 !~ /^</) group = group " " $2
            ended = substr($0, 2, 1) != "|"
            next
        }
        /^    [^ ]/ { group = group " " $1; next }
        /^[^ ]/ { flush(); pkg = $1 }
        END { flush() }'
}

# Prints $@ and the packages of their dependency closure that are not installed,
# each once; a group with an installed member is satisfied, otherwise its first
# member is taken. Packages in $no_descend are taken without their dependencies.
no_descend=" "
closure() {
    local -A seen=()
    local level=("$@") next pkg groups member chosen
    for pkg in "$@"; do seen[$pkg]=1; done
    while (( ${#level[@]} > 0 )); do
        printf '%s\n' "${level[@]}"
        next=()
        for pkg in "${level[@]}"; do
            [[ "$no_descend" == *" $pkg "* ]] || next+=("$pkg")
        done
        (( ${#next[@]} > 0 )) || break
        groups=$(dep_groups "${next[@]}")
        level=()
        while read -r pkg groups_line; do
            [[ -n "$pkg" ]] || continue
            chosen=
            for member in $groups_line; do
                if installed "$member"; then chosen=installed; break; fi
                [[ -n "$chosen" ]] || chosen=$member
            done
            [[ "$chosen" != installed && -z "${seen[$chosen]:-}" ]] || continue
            seen[$chosen]=1
            level+=("$chosen")
        done <<<"$groups"
    done
}

# Downloads packages into $debs unless already there; prints their file names.
download() {
    local uris missing=() name
    uris=$(apt-get download --print-uris "$@" 2>&1) || { log "$uris"; return 1; }
    uris=$(grep "^'" <<<"$uris") || { log "apt-get printed no download address for: $*"; return 1; }
    while read -r _ name _; do
        [[ -s "$debs/$name" ]] || missing+=("$name")
    done <<<"$uris"
    if (( ${#missing[@]} > 0 )); then
        (cd "$debs" && apt-get download -q "${apt_opts[@]}" "$@" >&2) || return 1
    fi
    awk '{ print $2 }' <<<"$uris"
}
# As root apt drops to user _apt, which cannot write here; skip the sandbox.
apt_opts=()
(( EUID != 0 )) || apt_opts=(-o APT::Sandbox::User=root)

# Resolves and downloads every package; sets kernel_pkg, tool_pkgs, all_debs.
# qemu-system-common's own dependencies serve its helpers and display modules,
# which a -display none guest never loads. Failures return (command
# substitutions are checked one by one) so that the caller can retry.
no_descend=" qemu-system-common "
fetch() {
    kernel_pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')
    [[ -n "$kernel_pkg" ]] || { log "apt knows no linux-image-amd64"; return 1; }
    tool_pkgs=$(closure qemu-system-x86 qemu-system-data seabios ipxe-qemu kmod \
        qemu-guest-agent) || return 1
    log "packages: $(tr '\n' ' ' <<<"$tool_pkgs")busybox-static $kernel_pkg"
    # shellcheck disable=SC2086 # package names, one per line
    all_debs=$(download $tool_pkgs busybox-static "$kernel_pkg") || return 1
}
# Empty or stale package lists (a kernel ABI bump removes the old package from
# the mirror): update once and resolve again.
if ! fetch; then
    apt_update
    fetch || die "cannot download the kit's packages (see above)"
fi

deb_of() {
    local deb
    deb=$(awk -v prefix="$1_" 'index($0, prefix) == 1 { print; exit }' <<<"$all_debs")
    [[ -n "$deb" ]] || die "no .deb of $1 among: $all_debs"
    echo "$deb"
}
busybox_deb=$(deb_of busybox-static)
kernel_deb=$(deb_of "$kernel_pkg")

# ---- QEMU and kmod ------------------------------------------------------------
root=$kit/root
mkdir -p "$root"
while read -r pkg; do
    deb=$(deb_of "$pkg")
    dpkg-deb -x "$debs/$deb" "$root"
done <<<"$tool_pkgs"
rm -rf "$root/usr/share/doc" "$root/usr/share/man"
libpath=$root/usr/lib/$arch:$root/lib/$arch

missing_libs=$(LD_LIBRARY_PATH=$libpath ldd "$root/usr/bin/qemu-system-x86_64" \
    "$root/usr/lib/$arch/qemu/accel-tcg-x86_64.so" | grep 'not found' || true)
[[ -z "$missing_libs" ]] || die "qemu-system-x86_64 still lacks libraries:"$'\n'"$missing_libs"

mkdir -p "$kit/bin"
# Relative paths, so the kit can move. QEMU_MODULE_DIR: TCG itself is a module.
cat >"$kit/bin/qemu-system-x86_64" <<EOF
#!/bin/sh
# Generated by scripts/guest-kit.sh: Debian 12's QEMU from the kit.
kit=\$(cd "\$(dirname "\$0")/.." && pwd)
root=\$kit/root
LD_LIBRARY_PATH=\$root/usr/lib/$arch:\$root/lib/$arch\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
QEMU_MODULE_DIR=\$root/usr/lib/$arch/qemu
export LD_LIBRARY_PATH QEMU_MODULE_DIR
exec "\$root/usr/bin/qemu-system-x86_64" \\
    -L "\$root/usr/share/qemu" -L "\$root/usr/share/seabios" -L "\$root/usr/lib/ipxe/qemu" "\$@"
EOF
chmod +x "$kit/bin/qemu-system-x86_64"
qemu_version=$("$kit/bin/qemu-system-x86_64" --version | head -n1) ||
    die "the kit's qemu-system-x86_64 does not run"
log "$qemu_version"

kmod_tool() {
    # kmod picks its personality from argv[0].
    local name=$1
    shift
    (export LD_LIBRARY_PATH=$libpath; exec -a "$name" "$root/bin/kmod" "$@")
}

# ---- kernel and modules -----------------------------------------------------
kroot=$work/kernel
mkdir -p "$kroot"
dpkg-deb --fsys-tarfile "$debs/$kernel_deb" |
    tar -x -C "$kroot" --wildcards './boot/vmlinuz-*' './lib/modules/*'
release=$(basename "$(find "$kroot/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n1)")
[[ -n "$release" && -f "$kroot/boot/vmlinuz-$release" ]] || die "no kernel image in $kernel_deb"
kmod_tool depmod -b "$kroot" "$release"

# modprobe resolves modules.dep and the soft dependencies (ext4 and jbd2 want
# crc32c) and prints them in load order.
mods=$work/initramfs/modules
mkdir -p "$mods"
order=$(kmod_tool modprobe -d "$kroot" -S "$release" --show-depends --ignore-install \
    -a virtio_pci virtio_blk virtio_console ext4) || die "modprobe cannot resolve the guest's modules"
: >"$mods/load-order"
while read -r verb path _; do
    [[ "$verb" == insmod ]] || continue   # "builtin X" needs nothing
    name=$(basename "$path")
    case "$name" in
        *.ko) cp "$path" "$mods/$name" ;;
        *.ko.xz) name=${name%.xz}; xz -dc "$path" >"$mods/$name" ;;
        *.ko.zst) name=${name%.zst}; zstd -qdc "$path" >"$mods/$name" ;;
        *.ko.gz) name=${name%.gz}; gzip -dc "$path" >"$mods/$name" ;;
        *) die "unexpected module file $path" ;;
    esac
    grep -qxF "$name" "$mods/load-order" || echo "$name" >>"$mods/load-order"
done <<<"$order"
log "modules: $(tr '\n' ' ' <"$mods/load-order")"
for want in virtio_pci.ko virtio_blk.ko virtio_console.ko ext4.ko; do
    grep -qxF "$want" "$mods/load-order" || die "$want is not in the module list"
done
cp "$kroot/boot/vmlinuz-$release" "$kit/vmlinuz"
echo "$release" >"$kit/kernel-release"

# ---- initramfs ----------------------------------------------------------------
ir=$work/initramfs
mkdir -p "$ir/bin" "$ir/dev" "$ir/proc" "$ir/sys" "$ir/mnt" "$ir/tmp"
dpkg-deb --fsys-tarfile "$debs/$busybox_deb" | tar -x -O ./bin/busybox >"$ir/bin/busybox"
chmod 755 "$ir/bin/busybox"
"$ir/bin/busybox" true || die "busybox from $busybox_deb does not run"
ln -s busybox "$ir/bin/sh"
install -m 755 "$init_src" "$ir/init"
# The guest agent (application-consistent points through guest-fsfreeze-freeze) with
# the libraries it links: from the kit's packages, or the host's own Debian 12 ones.
install -m 755 "$root/usr/sbin/qemu-ga" "$ir/bin/qemu-ga"
ga_libs=$(LD_LIBRARY_PATH=$libpath ldd "$root/usr/sbin/qemu-ga") ||
    die "ldd cannot read qemu-ga"
! grep -q 'not found' <<<"$ga_libs" || die "qemu-ga lacks libraries:"$'\n'"$ga_libs"
mkdir -p "$ir/lib/$arch" "$ir/lib64"
while read -r lib; do
    case "$lib" in
        */ld-linux-x86-64.so.2) cp -L "$lib" "$ir/lib64/ld-linux-x86-64.so.2" ;;
        /*) cp -L "$lib" "$ir/lib/$arch/" ;;
    esac
done < <(awk '$2 == "=>" { print $3; next } $1 ~ /^\// { print $1 }' <<<"$ga_libs")
[[ -f "$ir/lib64/ld-linux-x86-64.so.2" ]] || die "no dynamic loader for qemu-ga"
# The host may lack cpio; the kit's busybox writes newc archives.
(cd "$ir" && find . -mindepth 1 | LC_ALL=C sort | "$ir/bin/busybox" cpio -o -H newc -R 0:0) |
    gzip -9 >"$kit/initramfs.img.tmp"
mv "$kit/initramfs.img.tmp" "$kit/initramfs.img"

rm -rf "$work"
echo "$key" >"$kit/stamp"
log "built: $qemu_version; kernel $release; initramfs $(du -h "$kit/initramfs.img" | cut -f1)"
echo "guest-kit: $kit"
