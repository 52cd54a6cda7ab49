// Package proto defines the wire protocol between the Fireworks host and
// fireworks-init, the PID 1 inside every guest.
//
// The channel is a byte stream (a virtio-serial port in the guest, a unix
// socket on the host). It carries frames:
//
//	[type u8][id u32 big-endian][len u32 big-endian][payload, len bytes]
//
// The id is a request id for control requests and a session id for exec
// sessions; both are allocated by the host. Control payloads are JSON; data
// and window frames are raw bytes so bulk output is not re-encoded.
//
// The host treats everything the guest sends as untrusted: ReadFrame never
// allocates more than MaxPayload for one frame, and unknown frame types are
// returned as errors by the decoders here rather than being guessed at.
package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Version is the protocol version this build speaks. The host sends the
// highest version it supports in Hello; the guest answers with the version it
// will use. Both sides refuse versions they do not know, so only changes an
// older peer would misread bump it; additions an older peer rejects cleanly
// or ignores (a new request op, a new optional JSON field such as
// OpReattach and HelloReply.Sessions) do not.
const Version = 1

// HeaderSize is the size of a frame header on the wire.
const HeaderSize = 9

// MaxPayload bounds one frame's payload. It keeps a hostile peer from making
// the reader allocate arbitrary memory with a forged length.
const MaxPayload = 1 << 20

// MaxChunk is the largest data payload a sender puts in one frame. It is
// smaller than MaxPayload so one busy session cannot hog the shared channel.
const MaxChunk = 64 << 10

// InitialWindow is the number of bytes each side may send on each data
// stream of a session before the receiver grants more with a Window frame.
// Both sides start with it implicitly, so the first output needs no round
// trip. It bounds the memory a receiver buffers per stream.
const InitialWindow = 256 << 10

// Type identifies a frame's meaning.
type Type uint8

// Frame types. Direction is noted as H->G (host to guest) or G->H.
const (
	TypeHello      Type = 1  // H->G: JSON Hello
	TypeHelloReply Type = 2  // G->H: JSON HelloReply
	TypeRequest    Type = 3  // H->G: JSON Request; id = request id
	TypeResponse   Type = 4  // G->H: JSON Response; id = request id
	TypeExec       Type = 5  // H->G: JSON ExecRequest; id = new session id
	TypeStarted    Type = 6  // G->H: JSON Started; the session's process runs
	TypeStdin      Type = 7  // H->G: raw bytes for the session's stdin
	TypeStdout     Type = 8  // G->H: raw bytes (with TTY: the terminal output)
	TypeStderr     Type = 9  // G->H: raw bytes
	TypeWindow     Type = 10 // both: Window (binary), grants send credit
	TypeCloseStdin Type = 11 // H->G: empty; stdin reached EOF
	TypeSignal     Type = 12 // H->G: JSON Signal
	TypeResize     Type = 13 // H->G: JSON Resize
	TypeExit       Type = 14 // G->H: JSON ExitStatus; the session is over
)

// String names the type for logs and errors.
func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeHelloReply:
		return "hello-reply"
	case TypeRequest:
		return "request"
	case TypeResponse:
		return "response"
	case TypeExec:
		return "exec"
	case TypeStarted:
		return "started"
	case TypeStdin:
		return "stdin"
	case TypeStdout:
		return "stdout"
	case TypeStderr:
		return "stderr"
	case TypeWindow:
		return "window"
	case TypeCloseStdin:
		return "close-stdin"
	case TypeSignal:
		return "signal"
	case TypeResize:
		return "resize"
	case TypeExit:
		return "exit"
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Known reports whether t is a frame type of this protocol version.
func (t Type) Known() bool { return t >= TypeHello && t <= TypeExit }

// Frame is one message on the channel.
type Frame struct {
	Type    Type
	ID      uint32
	Payload []byte
}

// ErrFrameTooLarge is returned when a frame's declared length exceeds
// MaxPayload (reading) or its payload does (writing).
var ErrFrameTooLarge = errors.New("frame payload exceeds limit")

// ErrUnknownType is returned by ReadFrame for a type this version does not
// define. The stream is still in sync afterwards (the payload was consumed),
// but peers treat it as a protocol violation.
var ErrUnknownType = errors.New("unknown frame type")

// ReadFrame reads one frame from r. It never allocates more than MaxPayload
// bytes, and rejects unknown types after consuming their payload. A clean EOF
// before the first header byte is returned as io.EOF; a frame cut short is
// io.ErrUnexpectedEOF.
func ReadFrame(r io.Reader) (Frame, error) {
	var hdr [HeaderSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return Frame{}, err
	}
	f := Frame{Type: Type(hdr[0]), ID: binary.BigEndian.Uint32(hdr[1:5])}
	n := binary.BigEndian.Uint32(hdr[5:9])
	if n > MaxPayload {
		return Frame{}, fmt.Errorf("reading %s frame %d with %d bytes: %w", f.Type, f.ID, n, ErrFrameTooLarge)
	}
	if n > 0 {
		f.Payload = make([]byte, n)
		if _, err := io.ReadFull(r, f.Payload); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return Frame{}, fmt.Errorf("reading payload of %s frame %d: %w", f.Type, f.ID, err)
		}
	}
	if !f.Type.Known() {
		return Frame{}, fmt.Errorf("frame %d: %w %d", f.ID, ErrUnknownType, uint8(f.Type))
	}
	return f, nil
}

// AppendFrame appends f's wire encoding to b.
func AppendFrame(b []byte, f Frame) ([]byte, error) {
	if len(f.Payload) > MaxPayload {
		return b, fmt.Errorf("encoding %s frame %d with %d bytes: %w", f.Type, f.ID, len(f.Payload), ErrFrameTooLarge)
	}
	b = append(b, byte(f.Type))
	b = binary.BigEndian.AppendUint32(b, f.ID)
	b = binary.BigEndian.AppendUint32(b, uint32(len(f.Payload)))
	return append(b, f.Payload...), nil
}

// WriteFrame writes f to w in a single Write call, so that concurrent writers
// serialised by a mutex never interleave partial frames.
func WriteFrame(w io.Writer, f Frame) error {
	b, err := AppendFrame(make([]byte, 0, HeaderSize+len(f.Payload)), f)
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("writing %s frame %d: %w", f.Type, f.ID, err)
	}
	return nil
}
