package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	in := []Frame{
		{Type: TypeHello, ID: 0, Payload: []byte(`{"version":1}`)},
		{Type: TypeStdout, ID: 7, Payload: bytes.Repeat([]byte("x"), MaxChunk)},
		{Type: TypeCloseStdin, ID: 1<<32 - 1},
	}
	for _, f := range in {
		if err := WriteFrame(&buf, f); err != nil {
			t.Fatal(err)
		}
	}
	for i, want := range in {
		got, err := ReadFrame(&buf)
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if got.Type != want.Type || got.ID != want.ID || !bytes.Equal(got.Payload, want.Payload) {
			t.Fatalf("frame %d: got %v/%d/%d bytes, want %v/%d/%d bytes", i, got.Type, got.ID, len(got.Payload), want.Type, want.ID, len(want.Payload))
		}
	}
	if _, err := ReadFrame(&buf); err != io.EOF {
		t.Fatalf("at end: got %v, want io.EOF", err)
	}
}

func TestReadFrameRejectsOversize(t *testing.T) {
	hdr := []byte{byte(TypeStdout), 0, 0, 0, 1}
	hdr = binary.BigEndian.AppendUint32(hdr, MaxPayload+1)
	_, err := ReadFrame(bytes.NewReader(hdr))
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("got %v, want ErrFrameTooLarge", err)
	}
	if err := WriteFrame(io.Discard, Frame{Type: TypeStdout, Payload: make([]byte, MaxPayload+1)}); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("write: got %v, want ErrFrameTooLarge", err)
	}
}

func TestReadFrameRejectsUnknownType(t *testing.T) {
	b, _ := AppendFrame(nil, Frame{Type: 200, ID: 3, Payload: []byte("abc")})
	b, _ = AppendFrame(b, Frame{Type: TypeStdout, ID: 4})
	r := bytes.NewReader(b)
	if _, err := ReadFrame(r); !errors.Is(err, ErrUnknownType) {
		t.Fatalf("got %v, want ErrUnknownType", err)
	}
	// The payload was consumed, so the next frame still decodes.
	f, err := ReadFrame(r)
	if err != nil || f.Type != TypeStdout || f.ID != 4 {
		t.Fatalf("next frame: %v %v", f, err)
	}
}

func TestReadFrameTruncated(t *testing.T) {
	b, _ := AppendFrame(nil, Frame{Type: TypeStdout, ID: 1, Payload: []byte("hello")})
	for n := 1; n < len(b); n++ {
		if _, err := ReadFrame(bytes.NewReader(b[:n])); !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("cut at %d: got %v, want ErrUnexpectedEOF", n, err)
		}
	}
}

func TestDecodeWindow(t *testing.T) {
	w := Window{Stream: TypeStderr, Increment: 4096}
	got, err := DecodeWindow(w.Encode())
	if err != nil || got != w {
		t.Fatalf("round trip: %v %v", got, err)
	}
	for _, bad := range [][]byte{nil, {8, 0, 0, 0}, {byte(TypeExit), 0, 0, 0, 1}, {8, 0, 0, 0, 0}, {8, 0xff, 0xff, 0xff, 0xff}} {
		if _, err := DecodeWindow(bad); err == nil {
			t.Errorf("DecodeWindow(%x) accepted", bad)
		}
	}
}

// FuzzReadFrame feeds arbitrary bytes to the decoder: it must never panic,
// never return a payload over the limit, and whatever it accepts must
// re-encode to the bytes it consumed.
func FuzzReadFrame(f *testing.F) {
	ok, _ := AppendFrame(nil, Frame{Type: TypeStdout, ID: 1, Payload: []byte("hi")})
	f.Add(ok)
	win, _ := AppendFrame(nil, Frame{Type: TypeWindow, ID: 2, Payload: Window{Stream: TypeStdout, Increment: 9}.Encode()})
	f.Add(win)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{byte(TypeExit), 0, 0, 0, 1, 0, 0, 0, 2, '{', '}'})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		for {
			start := len(data) - r.Len()
			fr, err := ReadFrame(r)
			if err != nil {
				return
			}
			if len(fr.Payload) > MaxPayload || !fr.Type.Known() {
				t.Fatalf("accepted bad frame: type %d, %d bytes", fr.Type, len(fr.Payload))
			}
			enc, err := AppendFrame(nil, fr)
			if err != nil {
				t.Fatal(err)
			}
			end := len(data) - r.Len()
			if !bytes.Equal(enc, data[start:end]) {
				t.Fatalf("re-encoding differs from input")
			}
			// The payload decoders must not panic either.
			switch fr.Type {
			case TypeWindow:
				_, _ = DecodeWindow(fr.Payload)
			case TypeExit:
				var es ExitStatus
				_ = Decode(fr, &es)
			case TypeHelloReply:
				var hr HelloReply
				_ = Decode(fr, &hr)
			}
		}
	})
}
