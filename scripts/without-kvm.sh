#!/bin/bash
# Runs a command with a /dev that has no kvm node, to check what a machine without KVM does
# on one that has it:  scripts/without-kvm.sh COMMAND...
# It mounts over /dev, so it always first moves into a mount namespace of its own (never
# trusting the caller to have done so).
set -e
if [ "${FIREWORKS_WITHOUT_KVM_NS:-}" != inside ] || [ "$(readlink /proc/self/ns/mnt)" = "$(readlink /proc/$PPID/ns/mnt)" ]; then
  exec unshare -m --propagation private env FIREWORKS_WITHOUT_KVM_NS=inside "$0" "$@"
fi
realdev=$(mktemp -d)
mount --bind /dev $realdev
mount -t tmpfs -o mode=755 nodev /dev
for n in null zero full random urandom tty console kmsg loop-control vhost-net vhost-vsock fuse; do
  [ -e $realdev/$n ] || continue
  touch /dev/$n && mount --bind $realdev/$n /dev/$n
done
for n in $realdev/loop[0-9]*; do b=$(basename $n); touch /dev/$b && mount --bind $n /dev/$b; done
mkdir -p /dev/net /dev/pts /dev/shm /dev/mqueue
touch /dev/net/tun && mount --bind $realdev/net/tun /dev/net/tun
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
ln -s pts/ptmx /dev/ptmx
umount -l $realdev
rmdir $realdev
test ! -e /dev/kvm && echo "no /dev/kvm here"
exec "$@"
