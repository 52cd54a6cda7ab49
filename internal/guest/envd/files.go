package envd

import (
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
)

// /files: GET ?path= sends a file's bytes; POST ?path= writes one, from an octet-stream
// body (gzip if Content-Encoding says so) or from the "file" parts of a multipart form
// (each to ?path=, or to its own file name when no path is given). Bodies are streamed
// to and from the disk, never held whole; a full disk answers 507. The user is the
// username parameter, else the call's.

// fileEntry is the SDK's description of a file written.
type fileEntry struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Path string `json:"path"`
}

func (s *Server) files(w http.ResponseWriter, r *http.Request) {
	h := r.Header.Clone()
	if u := r.URL.Query().Get("username"); u != "" {
		h.Set("Authorization", "Basic "+basicUser(u))
	}
	switch r.Method {
	case http.MethodGet:
		s.getFile(w, r, h)
	case http.MethodPost:
		s.postFiles(w, r, h)
	default:
		http.Error(w, "GET or POST", http.StatusMethodNotAllowed)
	}
}

func (s *Server) getFile(w http.ResponseWriter, r *http.Request, h http.Header) {
	path, err := s.resolvePath(h, r.URL.Query().Get("path"))
	if err != nil {
		httpError(w, err)
		return
	}
	var f *os.File
	if err := s.asUser(h, func(User) error {
		var err error
		f, err = os.Open(path)
		return err
	}); err != nil {
		httpError(w, err)
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		httpError(w, err)
		return
	}
	if fi.IsDir() {
		http.Error(w, path+" is a directory", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", mime.FormatMediaType("inline", map[string]string{"filename": filepath.Base(path)}))
	http.ServeContent(w, r, "", fi.ModTime(), f)
}

func (s *Server) postFiles(w http.ResponseWriter, r *http.Request, h http.Header) {
	query := r.URL.Query().Get("path")
	var written []fileEntry
	ct, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if ct == "multipart/form-data" {
		mr := multipart.NewReader(r.Body, params["boundary"])
		for {
			part, err := mr.NextPart()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				http.Error(w, "multipart body: "+err.Error(), http.StatusBadRequest)
				return
			}
			if part.FormName() != "file" {
				continue
			}
			name := query
			if name == "" {
				// The part's file name is the file's path (FileName would keep only
				// its last element).
				_, dp, _ := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
				name = dp["filename"]
			}
			e, err := s.writeFile(h, name, part)
			if err != nil {
				httpError(w, err)
				return
			}
			written = append(written, e)
		}
	} else {
		var body io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" {
			gz, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, "gzip body: "+err.Error(), http.StatusBadRequest)
				return
			}
			defer gz.Close()
			body = gz
		}
		e, err := s.writeFile(h, query, body)
		if err != nil {
			httpError(w, err)
			return
		}
		written = append(written, e)
	}
	if len(written) == 0 {
		http.Error(w, "no file in the request", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(written)
}

// writeFile writes what r holds to the file name names (its directories made), as the
// caller's user (see asUser).
func (s *Server) writeFile(h http.Header, name string, r io.Reader) (fileEntry, error) {
	path, err := s.resolvePath(h, name)
	if err != nil {
		return fileEntry{}, err
	}
	err = s.asUser(h, func(User) error {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return err
		}
		_, err = io.Copy(f, r)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	})
	if err != nil {
		return fileEntry{}, err
	}
	return fileEntry{Name: filepath.Base(path), Type: "file", Path: path}, nil
}

func basicUser(u string) string { return base64.StdEncoding.EncodeToString([]byte(u + ":")) }

// httpError answers err with the status the SDK maps.
func httpError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, fs.ErrNotExist):
		code = http.StatusNotFound
	case errors.Is(err, fs.ErrPermission):
		code = http.StatusForbidden
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		code = http.StatusInsufficientStorage
	case errors.Is(err, syscall.EISDIR), errors.Is(err, syscall.ENOTDIR):
		code = http.StatusBadRequest
	}
	var ce interface{ Message() string }
	if errors.As(err, &ce) {
		code = http.StatusBadRequest
	}
	http.Error(w, fmt.Sprint(err), code)
}
