package volume

import (
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// InstallServer puts a copy of the volume server binary src on a tmpfs of its own
// mounted at dir (whatever was mounted there goes), read-only, and returns the copy's
// path. Why a filesystem of its own: the server holds CAP_DAC_READ_SEARCH, with which any
// file of a filesystem is opened by handle through any mount of it the process can name;
// its binary, bound into its jail, must be on a filesystem that holds nothing else.
// src must be static: the jail has no libraries.
func InstallServer(src, dir string) (string, error) {
	if err := checkStatic(src); err != nil {
		return "", err
	}
	in, err := os.Open(src)
	if err != nil {
		return "", fmt.Errorf("volume server binary: %w", err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return "", fmt.Errorf("volume server binary: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("volume server binary: %w", err)
	}
	// An earlier agent's (servers it started keep theirs in their jails).
	for unix.Unmount(dir, unix.MNT_DETACH) == nil {
	}
	size := fi.Size() + 1<<20
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("mode=0755,size=%d", size)); err != nil {
		return "", fmt.Errorf("volume server binary: mount a tmpfs on %s: %w", dir, err)
	}
	dst := filepath.Join(dir, ServerName)
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o555)
	if err == nil {
		_, err = io.Copy(out, in)
		err = errors.Join(err, out.Close())
	}
	if err == nil {
		err = unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, "")
	}
	if err != nil {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		return "", fmt.Errorf("volume server binary: copy %s to %s: %w", src, dst, err)
	}
	return dst, nil
}

// checkStatic refuses a dynamically linked binary (one with an interpreter).
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("volume server binary %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("volume server binary %s is dynamically linked: its jail has no libraries (build it with CGO_ENABLED=0, as `make build` does)", path)
		}
	}
	return nil
}
