package sandboxlog

import (
	"bytes"
	"context"
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
