#!/usr/bin/env bash
# Installs what Fireworks and its tests need on a Debian 12 machine (run as root). Idempotent.
# Every binary a test shells out to comes from here; .ci/run checks them (scripts/check-tools.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
pkgs=(
  qemu-system-x86 qemu-utils   # the VMM (microvm machine, QMP, TCG/KVM)
  e2fsprogs erofs-utils        # root and scratch disks (debugfs/fsck.erofs read them in tests)
  busybox-static               # the demo/test image is built from it
  lz4 kmod cpio                # guest kernel extraction; cpio cross-checks the initramfs
  crun                         # non-VM baseline for benchmarks
  iproute2 nftables            # sandbox networks: namespaces, veths, taps, NAT
  util-linux                   # unshare/nsenter (tests' private namespaces)
  mount                        # mount, umount, losetup: volumes are loop-mounted ext4 images
  debootstrap                  # image tests: a real Debian root filesystem (minbase)
  podman runc                  # differential tests: the same cases through a real container runtime
  tmux                         # TTY tests: a real pseudo-terminal
  buildah                      # fireworks template build: Dockerfiles without a Docker daemon
  etcd-server                  # the Kubernetes tests' API server stores in it (scripts/kube-tools.sh builds the rest)
  containerd containernetworking-plugins  # the Kubernetes tests' node: the kubelet's container runtime and pod network (bridge, host-local)
  ca-certificates
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

# QEMU 8.2 or later: restored VMs map template memory their VMM opened read-only
# (memory-backend-file readonly=on,rom=off). Debian 12 ships 7.2; its backports have 10.0.
qemu_ok() {
  local v
  v=$(qemu-system-x86_64 --version 2>/dev/null | sed -nE '1s/.*version ([0-9]+)\.([0-9]+).*/\1 \2/p')
  [ -n "$v" ] && read -r maj min <<<"$v" && { [ "$maj" -gt 8 ] || { [ "$maj" -eq 8 ] && [ "$min" -ge 2 ]; }; }
}
if ! qemu_ok; then
  . /etc/os-release
  if [ "${VERSION_CODENAME:-}" = bookworm ]; then
    src=/etc/apt/sources.list.d/fireworks-bookworm-backports.sources
    if ! grep -rqs '^Suites:.*bookworm-backports\|^deb .* bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >"$src"
    fi
    apt-get update -qq
    echo "installing: QEMU from bookworm-backports (Debian 12's 7.2 is older than 8.2)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  fi
  qemu_ok || { echo "QEMU $(qemu-system-x86_64 --version | head -1) is older than 8.2, which Fireworks needs" >&2; exit 1; }
fi

# Node.js 20.18 or later with npm: the E2B compatibility test runs the real `e2b` SDK
# (npm), which needs it. The base image has Node 20; Debian 12's own nodejs is 18, too old.
node_ok() {
  local v
  v=$(node --version 2>/dev/null | sed -nE 's/^v([0-9]+)\.([0-9]+).*/\1 \2/p')
  [ -n "$v" ] && read -r maj min <<<"$v" && { [ "$maj" -ge 22 ] || { [ "$maj" -eq 20 ] && [ "$min" -ge 18 ]; }; } && command -v npm >/dev/null
}
if ! node_ok; then
  echo "installing: nodejs npm (Debian's) for the E2B SDK test"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null || true
  node_ok || echo "warning: Node.js 20.18+ with npm is missing ($(node --version 2>/dev/null || echo none)): TestE2BSDK will fail (it needs the e2b SDK's Node)" >&2
fi

# The Go toolchain go.mod asks for, installed as /usr/local/go. Go itself fetches it,
# through whatever module proxy this machine's Go is configured with: a Go of 1.21 or later
# switches toolchains on request (GOTOOLCHAIN); an older one (Debian's golang-go is 1.19,
# installed only when there is no Go at all) can still download the toolchain module.
want=$(awk '/^go /{print $2}' "$repo/go.mod")
# Asked from / with GOTOOLCHAIN=local: inside the repo an older Go would switch itself to
# go.mod's version and report that, hiding that /usr/local/go is older.
have=$(cd / && GOTOOLCHAIN=local /usr/local/go/bin/go env GOVERSION 2>/dev/null || true)
if [ "$have" != "go$want" ]; then
  # One install at a time on this machine.
  exec 9>/usr/local/.fireworks-go-install.lock
  flock 9
  boot=/usr/local/go/bin/go
  [ -x "$boot" ] || boot=$(command -v go || true)
  if [ -z "$boot" ]; then
    echo "no Go found: installing Debian's golang-go to fetch Go $want with"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go >/dev/null
    boot=$(command -v go)
  fi
  tmp=$(mktemp -d)
  trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
  bootver=$(cd / && GOTOOLCHAIN=local "$boot" env GOVERSION)
  minor=$(echo "$bootver" | sed -nE 's/^go1\.([0-9]+).*/\1/p')
  # The download is checked against the Go checksum database whatever root's go env says.
  sumdb=(GOSUMDB=sum.golang.org GONOSUMDB= GONOSUMCHECK= GOPRIVATE= GOFLAGS=-modcacherw GOPATH="$tmp/gopath")
  if [ -z "$minor" ] || [ "$minor" -ge 21 ]; then
    # The toolchain switch downloads go$want into the module cache; GOROOT names it.
    dir=$(cd "$tmp" && env "${sumdb[@]}" GOTOOLCHAIN="go$want" "$boot" env GOROOT)
  else
    out=$(cd "$tmp" && env "${sumdb[@]}" "$boot" mod download -json "golang.org/toolchain@v0.0.1-go$want.linux-amd64" 2>&1 || true)
    dir=$(echo "$out" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [ -n "$dir" ] || echo "$out" >&2
  fi
  if [ -z "$dir" ] || [ ! -f "$dir/bin/go" ]; then
    echo "could not fetch Go $want with $boot ($bootver)" >&2
    exit 1
  fi
  echo "installing Go $want to /usr/local/go (fetched by $bootver)"
  new=$(mktemp -d /usr/local/go.new.XXXXXX)
  cp -a "$dir/." "$new/"
  chmod -R u+w,a+rX "$new"
  chmod a+x "$new"/bin/* "$new"/pkg/tool/*/*
  # Swap by renames, so /usr/local/go is never a half-copied tree.
  old=""
  if [ -e /usr/local/go ]; then old=$(mktemp -d /usr/local/go.old.XXXXXX) && rmdir "$old" && mv -T /usr/local/go "$old"; fi
  mv -T "$new" /usr/local/go
  [ -z "$old" ] || rm -rf "$old"
  /usr/local/go/bin/go version
fi
