package agent

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A saved state goes through the stream whole, holes kept as holes; a stream that names
// another file, repeats one, leaves one out or puts an extent outside its file is refused.
func TestSavedStream(t *testing.T) {
	src := t.TempDir()
	for name, data := range map[string]string{savedRecordFile: `{"main_session":3}`, "state": strings.Repeat("s", 70000)} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A 64 MiB scratch disk with data at its start and in its middle only.
	f, err := os.Create(filepath.Join(src, "scratch.img"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("head"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("middle"), 32<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()

	var stream bytes.Buffer
	for _, name := range savedFileNames {
		if err := writeSparse(&stream, name, filepath.Join(src, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := writeName(&stream, ""); err != nil {
		t.Fatal(err)
	}
	if stream.Len() > 1<<20 {
		t.Errorf("the stream of a sparse 64 MiB disk is %d bytes: holes were sent", stream.Len())
	}
	good := bytes.Clone(stream.Bytes())
	dst := t.TempDir()
	limits := map[string]uint64{savedRecordFile: maxSavedRecord, "state": 1 << 20, "scratch.img": 64 << 20}
	if err := readSaved(bytes.NewReader(good), dst, limits); err != nil {
		t.Fatal(err)
	}
	for _, name := range savedFileNames {
		a, _ := os.ReadFile(filepath.Join(src, name))
		b, _ := os.ReadFile(filepath.Join(dst, name))
		if !bytes.Equal(a, b) {
			t.Errorf("%s differs after the stream", name)
		}
	}
	if used := dirSize(dst); used > 8<<20 {
		t.Errorf("the received files take %d bytes: holes were filled", used)
	}

	hostile := map[string][]byte{}
	var b bytes.Buffer
	_ = writeName(&b, "../escape")
	hostile["unknown file"] = b.Bytes()
	var d bytes.Buffer
	_ = writeName(&d, "state")
	_ = binary.Write(&d, binary.BigEndian, uint64(10))
	_ = binary.Write(&d, binary.BigEndian, [2]uint64{8, 100})
	hostile["extent past the file"] = d.Bytes()
	var e bytes.Buffer
	_ = writeName(&e, "")
	hostile["no files"] = e.Bytes()
	hostile["cut short"] = good[:len(good)/2]
	var g bytes.Buffer
	_ = writeName(&g, "state")
	_ = binary.Write(&g, binary.BigEndian, uint64(2)<<20)
	hostile["a file past its bound"] = g.Bytes()
	for what, s := range hostile {
		if err := readSaved(bytes.NewReader(s), t.TempDir(), limits); err == nil {
			t.Errorf("%s: accepted", what)
		}
	}
}
