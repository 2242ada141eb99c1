#!/usr/bin/env bash
# Installs what NovaCron's demo, tests and benchmarks need on a fresh Debian 12 host (as
# root), and prepares the Linux guest: Debian's stock cloud kernel (downloaded, unpacked,
# never installed on the host) as bzImage and as ELF vmlinux, plus an initramfs of
# busybox-static and the project's workload.
#
# Idempotent: a second run only checks. Output: target/novacron-guest/{vmlinuz,vmlinux,initramfs.cpio.gz}
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for p in qemu-system-x86 busybox-static cpio lz4 gzip clang-19 llvm-19 libbpf-dev bpftool prometheus; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
# The coordinator benchmark's reference: a 3-member etcd on loopback.
for p in etcd-server etcd-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    echo "setup: installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo is missing (install Rust 1.85 or newer)"; exit 1; }

out=target/novacron-guest
mkdir -p "$out"
if [ ! -s "$out/vmlinux" ] || [ ! -s "$out/vmlinuz" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends:/ {print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends:/ {print $2; exit}')
    fi
    echo "setup: downloading $pkg (unpacked only, not installed)"
    (cd "$work" && apt-get download "$pkg" 2>/dev/null && dpkg-deb -x ./*.deb root)
    cp "$work"/root/boot/vmlinuz-* "$out/vmlinuz"
    # The ELF vmlinux inside the bzImage, so the VMM can enter it through its PVH note and
    # skip the decompressor (which runs emulated, and slowly, on PVM hosts).
    python3 - "$out/vmlinuz" "$work/payload" <<'PY'
import struct, sys
d = open(sys.argv[1], 'rb').read()
setup_sects = d[0x1f1] or 4
offset, length = struct.unpack_from('<II', d, 0x248)
start = (setup_sects + 1) * 512 + offset
open(sys.argv[2], 'wb').write(d[start:start + length])
PY
    magic=$(head -c 4 "$work/payload" | od -An -tx1 | tr -d ' ')
    case "$magic" in
        02214c18) lz4 -dc "$work/payload" > "$out/vmlinux" 2>/dev/null || true ;;
        1f8b08*) gzip -dc "$work/payload" > "$out/vmlinux" 2>/dev/null || true ;;
        fd377a58) xz -dc "$work/payload" > "$out/vmlinux" ;;
        28b52ffd) zstd -dc "$work/payload" > "$out/vmlinux" ;;
        *) echo "setup: unknown kernel compression (magic $magic)"; exit 1 ;;
    esac
    head -c 4 "$out/vmlinux" | grep -q ELF || { echo "setup: extracted vmlinux is not ELF"; exit 1; }
fi

# The initramfs: busybox and the workload, which /init starts with settings from the
# kernel command line (nc.* keys).
cargo build -q -p novacron-testguest
workload=$(find target/debug/build -path '*novacron-testguest*/out/*' -name 'novacron-workload' -type f | head -n 1)
[ -n "$workload" ] || { echo "setup: the static Linux workload was not built"; exit 1; }
if [ ! -s "$out/initramfs.cpio.gz" ] || [ "$workload" -nt "$out/initramfs.cpio.gz" ]; then
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp}
    cp /bin/busybox "$root/bin/busybox"
    for a in sh mount echo cat poweroff reboot sleep; do ln -s busybox "$root/bin/$a"; done
    cp "$workload" "$root/bin/nc-workload"
    cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "novacron-initramfs: up"
/bin/nc-workload $(cat /proc/cmdline)
echo "novacron-initramfs: workload exited"
poweroff -f
INIT
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.cpio.gz"
    rm -rf "$root"
fi
echo "setup: guest kernel and initramfs ready in $out"
