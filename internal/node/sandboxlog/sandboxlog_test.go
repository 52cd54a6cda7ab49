package sandboxlog

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

func TestFollowSeesEverythingInOrderAcrossStreams(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out.log")
	w, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write(Stdout, []byte("early ")); err != nil {
		t.Fatal(err)
	}
	var got [3]bytes.Buffer
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		err := Read(context.Background(), path, w, func(r Record) error {
			got[r.Stream].Write(r.Data)
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	}()
	big := bytes.Repeat([]byte("x"), 3*maxRecord+7) // spans several records
	for i := 0; i < 50; i++ {
		_ = w.Write(Stderr, []byte("e"))
		if i == 25 {
			_ = w.Write(Stdout, big)
		}
		time.Sleep(time.Millisecond)
	}
	_ = w.Close()
	wg.Wait()
	if want := append([]byte("early "), big...); !bytes.Equal(got[Stdout].Bytes(), want) {
		t.Errorf("stdout: got %d bytes, want %d", got[Stdout].Len(), len(want))
	}
	if got[Stderr].String() != string(bytes.Repeat([]byte("e"), 50)) {
		t.Errorf("stderr: %q", got[Stderr].String())
	}
	// A replay after close reads the same without a writer.
	var n int
	if err := Read(context.Background(), path, nil, func(r Record) error { n += len(r.Data); return nil }); err != nil {
		t.Fatal(err)
	}
	if n != len(big)+6+50 {
		t.Errorf("replay read %d bytes", n)
	}
}

func TestCorruptLogIsAnErrorNotAPanic(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out.log")
	w, _ := Create(path)
	_ = w.Write(Stdout, []byte("ok"))
	_ = w.Close()
	// Append garbage with an absurd length.
	f, _ := Create(path)
	f.f.Write([]byte{9, 0xff, 0xff, 0xff, 0xff})
	f.Close()
	err := Read(context.Background(), path, nil, func(Record) error { return nil })
	if err == nil {
		t.Fatal("corrupt record accepted")
	}
}

func TestMissingLogIsEmpty(t *testing.T) {
	if err := Read(context.Background(), filepath.Join(t.TempDir(), "none"), nil, func(Record) error {
		t.Fatal("record from a missing file")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// Past its limit the log stops growing, says so once on stderr, and keeps accepting
// writes (so a flooding guest is drained, not blocked).
func TestLimitedLogStopsGrowing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out.log")
	const limit = 1 << 20
	w, err := CreateLimited(path, limit)
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 64<<10)
	for range 64 { // 4 MiB offered
		if n, err := w.StreamWriter(Stdout).Write(chunk); err != nil || n != len(chunk) {
			t.Fatalf("write past the limit: %d, %v", n, err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() > limit+512 {
		t.Fatalf("log grew to %d bytes, limit %d", fi.Size(), limit)
	}
	var stdout, stderr int
	var notice string
	err = Read(context.Background(), path, nil, func(r Record) error {
		if r.Stream == Stdout {
			stdout += len(r.Data)
		} else {
			stderr++
			notice += string(r.Data)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if stdout < limit-1024 || stderr != 1 || notice != TruncationNotice(limit) {
		t.Fatalf("kept %d stdout bytes, %d stderr records %q", stdout, stderr, notice)
	}
	if d := w.Dropped(); d != int64(64*len(chunk)-stdout) {
		t.Errorf("dropped %d, want %d", d, 64*len(chunk)-stdout)
	}
	// Reopening (a restarted node) keeps the limit on the existing size.
	w2, err := CreateLimited(path, limit)
	if err != nil {
		t.Fatal(err)
	}
	_ = w2.Write(Stdout, chunk)
	w2.Close()
	if fi2, _ := os.Stat(path); fi2.Size() > fi.Size()+512 {
		t.Errorf("reopened log grew from %d to %d", fi.Size(), fi2.Size())
	}
}

// Logs sharing a budget stop together at its limit (each with a notice), and a removed
// log's bytes make room again.
func TestSharedBudget(t *testing.T) {
	dir := t.TempDir()
	b := NewBudget(100, 0)
	var ws []*Writer
	for _, name := range []string{"a", "b"} {
		w, err := CreateLimited(filepath.Join(dir, name), 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		w.SetBudget(b)
		ws = append(ws, w)
	}
	if err := ws[0].Write(Stdout, make([]byte, 60)); err != nil {
		t.Fatal(err)
	}
	if err := ws[1].Write(Stdout, make([]byte, 60)); err != nil {
		t.Fatal(err)
	}
	if b.Used() > 100 {
		t.Errorf("the budget holds %d bytes, past its 100", b.Used())
	}
	if ws[1].Dropped() == 0 {
		t.Error("the second log wrote past the shared budget")
	}
	b.Give(65)
	if b.Used() > 35 {
		t.Errorf("after a removal the budget holds %d", b.Used())
	}
}
