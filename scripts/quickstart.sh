#!/usr/bin/env bash
# From a fresh clone to a command running in a microVM: install deps, build, start
# `fireworks dev` in the background (if not already up), build a demo image from Debian's
# busybox-static, and run a command in a sandbox booted from it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

if [ "$(id -u)" != 0 ]; then
  echo "quickstart: run as root (it installs packages and the dev server manages VM disks)" >&2
  exit 1
fi
./scripts/install-deps.sh
make build

FW=./bin/fireworks
demo=/tmp/fireworks-demo
$FW demo-image "$demo" >/dev/null

if ! $FW info >/dev/null 2>&1; then
  echo "quickstart: starting fireworks dev (log: /tmp/fireworks-dev.log); the first start fetches the guest kernel"
  nohup $FW dev >/tmp/fireworks-dev.log 2>&1 &
  for _ in $(seq 1 600); do
    $FW info >/dev/null 2>&1 && break
    if ! kill -0 $! 2>/dev/null; then echo "fireworks dev exited:"; tail -20 /tmp/fireworks-dev.log; exit 1; fi
    sleep 0.5
  done
fi
$FW info | grep -E 'Accelerator|Guest kernel'
set -x
$FW run "oci:$demo" -- sh -c 'echo "hello from a Fireworks microVM running kernel $(uname -r) as $(id -un) on $(hostname)"'
