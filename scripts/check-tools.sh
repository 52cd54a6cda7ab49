#!/usr/bin/env bash
# Fails early, one line per missing tool, when a binary that Fireworks or its tests shell
# out to is not installed. Keep this list in step with scripts/install-deps.sh: a test that
# starts using a new tool adds it to both.
set -uo pipefail
tools=(
  # tool                package that brings it
  "qemu-system-x86_64   qemu-system-x86"
  "mkfs.ext4            e2fsprogs"
  "e2fsck               e2fsprogs"
  "dumpe2fs             e2fsprogs"
  "tune2fs              e2fsprogs"
  "debugfs              e2fsprogs"
  "mkfs.erofs           erofs-utils"
  "fsck.erofs           erofs-utils"
  "busybox              busybox-static"
  "lz4                  lz4"
  "depmod               kmod"
  "cpio                 cpio"
  "crun                 crun"
  "ip                   iproute2"
  "tc                   iproute2"
  "nft                  nftables"
  "unshare              util-linux"
  "nsenter              util-linux"
  "setpriv              util-linux"
  "mount                mount"
  "umount               mount"
  "losetup              mount"
  "dmesg                util-linux"
  "pkill                procps"
  "pgrep                procps"
  "apt-get              apt"
  "apt-cache            apt"
  "dpkg-deb             dpkg"
  "file                 file"
  "sha256sum            coreutils"
  "cp                   coreutils"
  "debootstrap          debootstrap"
  "podman               podman"
  "runc                 runc"
  "tmux                 tmux"
  "buildah              buildah"
  "etcd                 etcd-server"
  "containerd           containerd"
  "ctr                  containerd"
  "/usr/lib/cni/bridge  containernetworking-plugins"
  "/usr/lib/cni/host-local containernetworking-plugins"
  "node                 (Node.js 20.18+: the base image's, see scripts/install-deps.sh)"
  "npm                  (npm, with Node.js)"
  "go                   (scripts/install-deps.sh installs Go to /usr/local/go)"
)
missing=0
for entry in "${tools[@]}"; do
  read -r tool pkg <<<"$entry"
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "missing tool: $tool (install $pkg; scripts/install-deps.sh should have)" >&2
    missing=1
  fi
done
if command -v node >/dev/null 2>&1; then
  # The e2b SDK TestE2BSDK runs needs Node.js 20.18+ (its package.json's engines).
  read -r nmaj nmin <<<"$(node --version | sed -nE 's/^v([0-9]+)\.([0-9]+).*/\1 \2/p')"
  if [ "${nmaj:-0}" -lt 20 ] || { [ "$nmaj" -eq 20 ] && [ "${nmin:-0}" -lt 18 ]; } || [ "$nmaj" -eq 21 ]; then
    echo "Node.js $(node --version) is too old for the e2b SDK (20.18+ or 22+; the base image's is; scripts/install-deps.sh)" >&2
    missing=1
  fi
fi
if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  v=$(qemu-system-x86_64 --version | sed -nE '1s/.*version ([0-9]+)\.([0-9]+).*/\1 \2/p')
  read -r maj min <<<"${v:-0 0}"
  if [ "$maj" -lt 8 ] || { [ "$maj" -eq 8 ] && [ "$min" -lt 2 ]; }; then
    echo "QEMU $maj.$min is older than 8.2 (install it from bookworm-backports; scripts/install-deps.sh does)" >&2
    missing=1
  fi
fi
[ -e /dev/net/tun ] || { echo "missing device: /dev/net/tun (modprobe tun)" >&2; missing=1; }
exit $missing
