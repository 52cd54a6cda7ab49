package initd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/fireworks-sandbox/fireworks/internal/guest/proto"
)

// defaultPath is used when the session environment has no PATH, matching
// Docker's default.
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// startError is a failure to start a session's process, classified the way
// Docker reports it.
type startError struct {
	kind string // proto.ErrKind*
	err  error
}

func (e *startError) Error() string { return e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

func setupErr(format string, a ...any) *startError {
	return &startError{kind: proto.ErrKindSetup, err: fmt.Errorf(format, a...)}
}

// lookPath resolves file like execvp: names with a slash are used as they
// are (relative to dir), others are searched in pathList. A candidate that
// exists but is not executable is remembered so that the result is "not
// executable" rather than "not found", as execvp returns EACCES then.
func lookPath(file, pathList, dir string) (string, error) {
	if file == "" {
		return "", &startError{kind: proto.ErrKindNotFound, err: errors.New(`exec: "": executable file not found`)}
	}
	if strings.Contains(file, "/") {
		if err := checkExecutable(inDir(dir, file)); err != nil {
			return "", classify(file, err)
		}
		return file, nil
	}
	sawNotExec := false
	for _, d := range filepath.SplitList(pathList) {
		if d == "" {
			d = "." // POSIX: an empty entry is the current directory
		}
		p := filepath.Join(d, file)
		err := checkExecutable(inDir(dir, p))
		if err == nil {
			if !filepath.IsAbs(p) && !strings.HasPrefix(p, ".") {
				p = "./" + p // keep execve from treating it as a bare name
			}
			return p, nil
		}
		if errors.Is(err, fs.ErrPermission) {
			sawNotExec = true
		}
	}
	if sawNotExec {
		return "", &startError{kind: proto.ErrKindNotExecutable, err: fmt.Errorf("exec: %q: permission denied", file)}
	}
	return "", &startError{kind: proto.ErrKindNotFound, err: fmt.Errorf("exec: %q: executable file not found in $PATH", file)}
}

func inDir(dir, p string) string {
	if filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(dir, p)
}

// checkExecutable returns nil for a regular file with an execute bit,
// fs.ErrPermission for anything else that exists.
func checkExecutable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return fs.ErrPermission
	}
	return nil
}

// classify maps an error from lookPath or execve to a start error kind.
func classify(file string, err error) *startError {
	var se *startError
	if errors.As(err, &se) {
		return se
	}
	switch {
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ENOTDIR):
		return &startError{kind: proto.ErrKindNotFound, err: fmt.Errorf("exec: %q: %w", file, err)}
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM), errors.Is(err, syscall.ENOEXEC),
		errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ETXTBSY), errors.Is(err, syscall.ELOOP),
		errors.Is(err, fs.ErrPermission):
		return &startError{kind: proto.ErrKindNotExecutable, err: fmt.Errorf("exec: %q: %w", file, err)}
	}
	return &startError{kind: proto.ErrKindSetup, err: fmt.Errorf("starting %q: %w", file, err)}
}

// mergeEnv returns base with over applied by key; later entries win and the
// first position of a key is kept.
func mergeEnv(base, over []string) []string {
	out := make([]string, 0, len(base)+len(over))
	idx := map[string]int{}
	for _, list := range [][]string{base, over} {
		for _, kv := range list {
			k, _, _ := strings.Cut(kv, "=")
			if i, ok := idx[k]; ok {
				out[i] = kv
				continue
			}
			idx[k] = len(out)
			out = append(out, kv)
		}
	}
	return out
}

func getEnv(env []string, key string) (string, bool) {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, _ := strings.Cut(env[i], "="); k == key {
			return v, true
		}
	}
	return "", false
}
