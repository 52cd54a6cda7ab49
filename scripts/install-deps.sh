#!/usr/bin/env bash
# Installs what Fireworks needs on a Debian 12 machine (run as root). Idempotent.
set -euo pipefail
pkgs=(
  qemu-system-x86 qemu-utils   # the VMM (microvm machine, QMP, TCG/KVM)
  e2fsprogs erofs-utils        # root and scratch disks
  busybox-static               # the demo/test image is built from it
  lz4 kmod                     # guest kernel extraction
  crun                         # non-VM baseline for benchmarks
  iproute2 ca-certificates
)
missing=()
for p in "${pkgs[@]}"; do
  case "$p" in \#*) continue;; esac
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# apt-get download of the guest kernel needs fresh package lists even when nothing is missing.
if [ ! -d /var/lib/apt/lists ] || [ -z "$(ls /var/lib/apt/lists/*Packages* 2>/dev/null | head -1)" ] || [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
