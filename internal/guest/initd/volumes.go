package initd

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
	"golang.org/x/sys/unix"
)

// volumeOrder is the initramfs's list of the NFS client's modules (assets.VolumeOrder),
// relative to /lib/modules.
const volumeOrder = "volume.order"

// nfsOptions are every volume mount's: NFSv3 over TCP with MOUNT on the same port (the
// node's server answers both there, so the kernel needs no helper); file locks go to the
// node's lock manager (see lockservices.go for the guest's side); noacl because the
// server has no ACL protocol; actimeo=0 so that what other sandboxes change (new files, renames, deletes,
// appends) is seen at the next look, not after an attribute cache's minute; retry=0 so
// that a mount whose server does not answer fails instead of retrying for minutes. Hard
// mounts (the default): a server that goes away for a while (the sandbox is migrated, or
// its node's agent restarts) makes calls wait, never fail with data lost.
const nfsOptions = "vers=3,proto=tcp,mountproto=tcp,noacl,actimeo=0,retry=0"

// MountVolumes mounts each volume in the (set-up) root, loading the NFS client first
// if this boot has not yet.
func (p *pid1System) MountVolumes(vols []proto.VolumeMount) error {
	if len(vols) == 0 {
		return nil
	}
	if !p.rooted {
		return errors.New("volumes before setup")
	}
	if err := p.loadVolumeModules(); err != nil {
		return err
	}
	if p.locks == nil {
		ls, err := startLockServices()
		if err != nil {
			return err
		}
		p.locks = ls
	}
	for _, v := range vols {
		if err := os.MkdirAll(v.Path, 0o755); err != nil {
			return fmt.Errorf("volume mount point %s: %w", v.Path, err)
		}
		port := strconv.Itoa(int(v.Port))
		opts := nfsOptions + ",port=" + port + ",mountport=" + port + ",addr=" + v.Server + ",mountaddr=" + v.Server
		var flags uintptr
		if v.ReadOnly {
			flags |= unix.MS_RDONLY
		}
		if err := unix.Mount(v.Server+":/", v.Path, "nfs", flags, opts); err != nil {
			return fmt.Errorf("mount the volume served on port %s at %s: %w", port, v.Path, err)
		}
		p.log.Info("volume mounted", "path", v.Path, "port", v.Port, "read_only", v.ReadOnly)
	}
	return nil
}

// loadVolumeModules loads the NFS client's modules from the initramfs, through the
// directory opened at boot (the initramfs is out of sight since the switch of root).
func (p *pid1System) loadVolumeModules() error {
	if p.volumeMods {
		return nil
	}
	if p.modDir == nil {
		return errors.New("this guest's initramfs has no module directory: it cannot mount volumes")
	}
	fd, err := unix.Openat(int(p.modDir.Fd()), volumeOrder, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("this guest's initramfs lists no volume modules (%s: %w): it predates volumes", volumeOrder, err)
	}
	f := os.NewFile(uintptr(fd), volumeOrder)
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 64<<10))
	for sc.Scan() {
		name := strings.TrimSpace(sc.Text())
		if name == "" {
			continue
		}
		if strings.ContainsAny(name, "/\x00") || name == "." || name == ".." {
			return fmt.Errorf("bad module name %q in %s", name, volumeOrder)
		}
		mfd, err := unix.Openat(int(p.modDir.Fd()), name+".ko", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open module %s: %w", name, err)
		}
		err = unix.FinitModule(mfd, "", 0)
		unix.Close(mfd)
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("load module %s: %w", name, err)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", volumeOrder, err)
	}
	p.volumeMods = true
	return nil
}
