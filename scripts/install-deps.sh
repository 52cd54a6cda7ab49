#!/usr/bin/env bash
# Installs what Fireworks needs on a Debian 12 machine (run as root). Idempotent.
set -euo pipefail
pkgs=(
  qemu-system-x86 qemu-utils   # the VMM (microvm machine, QMP, TCG/KVM)
  e2fsprogs erofs-utils        # root and scratch disks
  busybox-static               # the demo/test image is built from it
  lz4 kmod                     # guest kernel extraction
  crun                         # non-VM baseline for benchmarks
  iproute2 nftables           # sandbox networks: namespaces, veths, taps, NAT
  ca-certificates
  curl unzip                   # fetching the Go toolchain from the module proxy
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

# The Go toolchain go.mod asks for, from the Go module proxy (golang.org/toolchain), when
# /usr/local/go is missing or older. Debian's golang-go is too old to switch by itself.
want=$(awk '/^go /{print $2}' "$(dirname "$0")/../go.mod")
have=$(/usr/local/go/bin/go env GOVERSION 2>/dev/null || true)
if [ "$have" != "go$want" ]; then
  proxy=${GOPROXY:-https://proxy.golang.org}; proxy=${proxy%%,*}
  [ "$proxy" = direct ] || [ "$proxy" = off ] && proxy=https://proxy.golang.org
  echo "installing Go $want to /usr/local/go (from $proxy)"
  tmp=$(mktemp -d)
  curl -fsSL "$proxy/golang.org/toolchain/@v/v0.0.1-go$want.linux-amd64.zip" -o "$tmp/go.zip"
  unzip -q "$tmp/go.zip" -d "$tmp"
  rm -rf /usr/local/go
  mv "$tmp/golang.org/toolchain@v0.0.1-go$want.linux-amd64" /usr/local/go
  chmod -R a+rX /usr/local/go && chmod a+x /usr/local/go/bin/* /usr/local/go/pkg/tool/*/* 2>/dev/null || true
  rm -rf "$tmp"
  /usr/local/go/bin/go version
fi
