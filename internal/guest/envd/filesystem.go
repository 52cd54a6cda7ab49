package envd

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	fspb "github.com/fireworks-sandbox/fireworks/internal/guest/envd/filesystempb"
)

// filesystemService is filesystem.Filesystem. Calls act as the caller's user: what they
// make is theirs (init runs as root; the guest's permissions are the guest's business,
// as they are for a process the user starts).
type filesystemService struct{ s *Server }

// maxListEntries bounds one ListDir answer.
const maxListEntries = 100_000

func (f *filesystemService) Stat(ctx context.Context, req *connect.Request[fspb.StatRequest]) (*connect.Response[fspb.StatResponse], error) {
	path, err := f.s.resolvePath(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	var e *fspb.EntryInfo
	if err := f.s.asUser(req.Header(), func(User) error { e, err = entryOf(path); return err }); err != nil {
		return nil, fsError(err)
	}
	return connect.NewResponse(&fspb.StatResponse{Entry: e}), nil
}

func (f *filesystemService) MakeDir(ctx context.Context, req *connect.Request[fspb.MakeDirRequest]) (*connect.Response[fspb.MakeDirResponse], error) {
	path, err := f.s.resolvePath(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	var e *fspb.EntryInfo
	err = f.s.asUser(req.Header(), func(User) error {
		if fi, err := os.Stat(path); err == nil {
			if fi.IsDir() {
				return connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("directory %s exists already", path))
			}
			return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s exists and is not a directory", path))
		}
		if err := os.MkdirAll(path, 0o755); err != nil {
			return err
		}
		e, err = entryOf(path)
		return err
	})
	if err != nil {
		return nil, fsError(err)
	}
	return connect.NewResponse(&fspb.MakeDirResponse{Entry: e}), nil
}

func (f *filesystemService) Move(ctx context.Context, req *connect.Request[fspb.MoveRequest]) (*connect.Response[fspb.MoveResponse], error) {
	src, err := f.s.resolvePath(req.Header(), req.Msg.GetSource())
	if err != nil {
		return nil, err
	}
	dst, err := f.s.resolvePath(req.Header(), req.Msg.GetDestination())
	if err != nil {
		return nil, err
	}
	var e *fspb.EntryInfo
	err = f.s.asUser(req.Header(), func(User) error {
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		if err := os.Rename(src, dst); err != nil {
			return err
		}
		e, err = entryOf(dst)
		return err
	})
	if err != nil {
		return nil, fsError(err)
	}
	return connect.NewResponse(&fspb.MoveResponse{Entry: e}), nil
}

func (f *filesystemService) ListDir(ctx context.Context, req *connect.Request[fspb.ListDirRequest]) (*connect.Response[fspb.ListDirResponse], error) {
	path, err := f.s.resolvePath(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	depth := int(req.Msg.GetDepth())
	if depth == 0 {
		depth = 1
	}
	var out []*fspb.EntryInfo
	var walk func(dir string, left int) error
	walk = func(dir string, left int) error {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, de := range entries {
			if err := ctx.Err(); err != nil {
				return err
			}
			if len(out) >= maxListEntries {
				return fmt.Errorf("more than %d entries: list a smaller depth", maxListEntries)
			}
			p := filepath.Join(dir, de.Name())
			e, err := entryOf(p)
			if err != nil {
				continue // gone meanwhile
			}
			out = append(out, e)
			// Symbolic links are listed, not followed (a loop would never end).
			if de.IsDir() && left > 1 {
				if err := walk(p, left-1); err != nil && !errors.Is(err, fs.ErrPermission) {
					return err
				}
			}
		}
		return nil
	}
	err = f.s.asUser(req.Header(), func(User) error {
		fi, err := os.Stat(path)
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("%s is not a directory", path))
		}
		return walk(path, depth)
	})
	if err != nil {
		return nil, fsError(err)
	}
	return connect.NewResponse(&fspb.ListDirResponse{Entries: out}), nil
}

func (f *filesystemService) Remove(ctx context.Context, req *connect.Request[fspb.RemoveRequest]) (*connect.Response[fspb.RemoveResponse], error) {
	path, err := f.s.resolvePath(req.Header(), req.Msg.GetPath())
	if err != nil {
		return nil, err
	}
	err = f.s.asUser(req.Header(), func(User) error {
		if _, err := os.Lstat(path); err != nil {
			return err
		}
		return os.RemoveAll(path)
	})
	if err != nil {
		return nil, fsError(err)
	}
	return connect.NewResponse(&fspb.RemoveResponse{}), nil
}

// entryOf describes the file at path (a symbolic link as itself, with its target).
func entryOf(path string) (*fspb.EntryInfo, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	e := &fspb.EntryInfo{Name: fi.Name(), Path: path, Size: fi.Size(), Mode: uint32(fi.Mode().Perm()),
		Permissions: fi.Mode().String(), ModifiedTime: timestamppb.New(fi.ModTime())}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		e.Type = fspb.FileType_FILE_TYPE_SYMLINK
		if t, err := os.Readlink(path); err == nil {
			e.SymlinkTarget = &t
		}
		// The SDK reports a link as what it points to, when that is there.
		if ti, err := os.Stat(path); err == nil && ti.IsDir() {
			e.Type = fspb.FileType_FILE_TYPE_DIRECTORY
		} else if err == nil {
			e.Type = fspb.FileType_FILE_TYPE_FILE
		}
	case fi.IsDir():
		e.Type = fspb.FileType_FILE_TYPE_DIRECTORY
	default:
		e.Type = fspb.FileType_FILE_TYPE_FILE
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.Owner, e.Group = nameOfUID(st.Uid), nameOfGID(st.Gid)
	}
	return e, nil
}

func nameOfUID(uid uint32) string {
	if u, err := user.LookupId(strconv.Itoa(int(uid))); err == nil {
		return u.Username
	}
	return strconv.Itoa(int(uid))
}

func nameOfGID(gid uint32) string {
	if g, err := user.LookupGroupId(strconv.Itoa(int(gid))); err == nil {
		return g.Name
	}
	return strconv.Itoa(int(gid))
}

// fsError is a filesystem error as the SDK maps it.
func fsError(err error) error {
	var ce *connect.Error
	switch {
	case errors.As(err, &ce):
		return err
	case errors.Is(err, fs.ErrNotExist):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, fs.ErrPermission):
		return connect.NewError(connect.CodePermissionDenied, err)
	case errors.Is(err, fs.ErrExist):
		return connect.NewError(connect.CodeAlreadyExists, err)
	case errors.Is(err, syscall.ENOSPC):
		return connect.NewError(connect.CodeResourceExhausted, err)
	case errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTEMPTY):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeCanceled, err)
	}
	return connect.NewError(connect.CodeInternal, err)
}
