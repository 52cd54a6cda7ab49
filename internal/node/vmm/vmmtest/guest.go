package vmmtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"github.com/fireworks-sandbox/fireworks/internal/node/assets"
)

// ReadyMarker is printed on the serial console by the test guest once its modules are
// loaded and it is about to serve the agent port.
const ReadyMarker = "FIREWORKS-VMMTEST-READY"

// ServeBody is what the test guest's web server (the serve command) answers.
const ServeBody = "hello-from-the-guest"

// PortName is the name of the virtio-serial port (or equivalent) the test guest serves.
const PortName = "fireworks.0"

// InitScript is /init of the test guest (busybox sh). It loads the modules named by
// fw.mods= on the kernel command line (the kernel hands dotted parameters to no one but
// /proc/cmdline), prints ReadyMarker, then serves a line protocol on the agent port:
//
//	echo TEXT   -> TEXT
//	cpus        -> number of online CPUs
//	mem         -> MemTotal in kB
//	disk N      -> "ro=R bytes=HEX" for the N-th virtio disk (0 = vda): read-only flag and first 16 bytes
//	wdisk N S   -> writes S (padded to 16 bytes) at the start of the N-th disk, synced: "ok"
//	put V       -> stores V in a shell variable (guest memory), answers "ok"
//	get         -> the stored value
//	rand        -> 16 bytes of /dev/urandom in hex
//	ifaces      -> the names of the network interfaces other than lo, space separated
//	net CIDR GW -> brings lo and the first other interface up with address CIDR and a
//	               default route via GW: "ok IFACE", or "error ..."
//	fetch URL   -> the first line of the body wget gets from URL (or wget's error)
//	serve PORT  -> starts busybox httpd on PORT serving "` + ServeBody + `" at /: "ok"
//	poweroff    -> powers the guest off
//	panic       -> crashes the guest kernel (sysrq c)
//
// Reading the port returns EOF while the host side is not connected, so the loop reopens it.
const InitScript = `#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
exec </dev/console >/dev/console 2>&1
mods=
for a in $(cat /proc/cmdline); do
	case "$a" in fw.mods=*) mods="${a#fw.mods=}" ;; esac
done
for m in $(echo "$mods" | tr , ' '); do
	insmod /lib/modules/$m.ko || echo "vmmtest: insmod $m failed"
done
echo "` + ReadyMarker + ` cpus=$(grep -c ^processor /proc/cpuinfo)"
port=
while [ -z "$port" ]; do
	for p in /sys/class/virtio-ports/*; do
		[ "$(cat $p/name 2>/dev/null)" = "` + PortName + `" ] && port=/dev/${p##*/}
	done
	[ -n "$port" ] && [ -e "$port" ] || { port=; sleep 0.05; }
done
while :; do
	exec 3<>"$port"
	while read -r cmd arg <&3; do
		case "$cmd" in
		echo) echo "$arg" >&3 ;;
		cpus) grep -c ^processor /proc/cpuinfo >&3 ;;
		mem) awk '/^MemTotal:/ {print $2}' /proc/meminfo >&3 ;;
		disk)
			d=vd$(echo abcdefgh | cut -c$((arg + 1)))
			echo "ro=$(cat /sys/block/$d/ro 2>/dev/null) bytes=$(head -c 16 /dev/$d 2>/dev/null | od -An -tx1 | tr -d ' \n')" >&3 ;;
		wdisk)
			set -- $arg
			d=vd$(echo abcdefgh | cut -c$(($1 + 1)))
			if printf '%-16s' "$2" | dd of=/dev/$d bs=16 count=1 conv=notrunc,fsync 2>/dev/null; then echo ok >&3; else echo error >&3; fi ;;
		put) val="$arg"; echo ok >&3 ;;
		get) echo "$val" >&3 ;;
		rand) head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >&3; echo >&3 ;;
		ifaces) echo $(ls /sys/class/net | grep -vx lo) >&3 ;;
		net)
			set -- $arg
			ifc=$(ls /sys/class/net | grep -vx lo | head -n 1)
			if [ -z "$ifc" ]; then
				echo "error no network interface" >&3
			elif out=$(ip link set lo up 2>&1 && ip link set "$ifc" up 2>&1 && ip addr add "$1" dev "$ifc" 2>&1 && ip route add default via "$2" 2>&1); then
				echo "ok $ifc" >&3
			else
				echo "error" $out >&3
			fi ;;
		fetch) echo $(timeout 20 wget -q -O - "$arg" 2>&1 | head -n 1) >&3 ;;
		serve)
			mkdir -p /www && echo "` + ServeBody + `" >/www/index.html
			if out=$(httpd -p "$arg" -h /www 2>&1); then echo ok >&3; else echo "error" $out >&3; fi ;;
		poweroff) echo bye >&3; poweroff -f ;;
		panic) echo c >/proc/sysrq-trigger ;;
		*) echo "unknown command $cmd" >&3 ;;
		esac
	done
	exec 3<&-
	sleep 0.1
done
`

// BusyboxPath is where the static busybox is looked for (Debian's busybox-static).
var BusyboxPath = "/bin/busybox"

// BuildGuest builds the test guest's initramfs for kernel k: InitScript as /init and a
// static busybox.
func BuildGuest(ctx context.Context, cacheDir string, k *assets.Kernel) (*assets.Initramfs, error) {
	if err := checkStatic(BusyboxPath); err != nil {
		return nil, err
	}
	return assets.BuildInitramfsFiles(ctx, cacheDir, k, []assets.File{
		{Path: "/init", Mode: 0o755, Data: []byte(InitScript)},
		{Path: "/bin/busybox", Mode: 0o755, Source: BusyboxPath},
	})
}

// checkStatic makes sure busybox does not need a dynamic loader the initramfs lacks.
func checkStatic(path string) error {
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("static busybox not found at %s (apt-get install busybox-static): %w", path, err)
	}
	out, _ := exec.Command("file", "-L", path).Output()
	if len(out) > 0 && !strings.Contains(string(out), "statically linked") && !strings.Contains(string(out), "static-pie") {
		return fmt.Errorf("%s is not statically linked (apt-get install busybox-static): %s", path, out)
	}
	return nil
}
