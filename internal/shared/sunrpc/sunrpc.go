// Package sunrpc is the little of ONC RPC (RFC 5531) over TCP that the volume lock
// services need: a server that reads record-marked calls from a connection, hands each
// to a handler (concurrently: a lock call may wait) and writes the replies, and XDR
// encoding of the few types those calls carry. The guest's init (a portmapper and a
// status monitor on its loopback) and the node's volume server (the lock manager) both
// use it; the NFS protocol itself is go-nfs's.
//
// Everything read is untrusted: records are bounded (MaxRecord) and strings and opaques
// by their callers' limits.
package sunrpc

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// MaxRecord bounds one call (all its fragments): lock calls are a few hundred bytes.
const MaxRecord = 64 << 10

// maxInFlight bounds the calls one connection may have under way at once.
const maxInFlight = 64

// Accept statuses of a reply (RFC 5531 accept_stat).
const (
	Success      = 0
	ProgUnavail  = 1
	ProgMismatch = 2
	ProcUnavail  = 3
	GarbageArgs  = 4
	SystemErr    = 5
)

// Call is one call as read: its program, version and procedure, and its arguments
// (after the credentials and verifier, which are skipped: these services rely on who can
// reach them, not on AUTH_SYS, which anyone can claim).
type Call struct {
	XID, Prog, Vers, Proc uint32
	Args                  *Reader
	// Remote is the peer's address.
	Remote net.Addr
}

// Reply is a handler's answer: Status, and for Success the results. For ProgMismatch,
// Low and High are the versions the program has.
type Reply struct {
	Status    uint32
	Results   []byte
	Low, High uint32
}

// Handler answers calls. It may block (a lock that waits); calls of one connection are
// handled concurrently and their replies sent as they are ready.
type Handler func(Call) Reply

// Serve answers calls on ln until it fails (closed).
func Serve(ln net.Listener, h Handler) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		go ServeConn(c, h)
	}
}

// ServeConn answers calls on c until it ends or sends what is not a call.
func ServeConn(c net.Conn, h Handler) {
	defer c.Close()
	r := bufio.NewReader(c)
	var wmu sync.Mutex
	sem := make(chan struct{}, maxInFlight)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		rec, err := readRecord(r)
		if err != nil {
			return
		}
		call, err := parseCall(rec)
		if err != nil {
			return
		}
		call.Remote = c.RemoteAddr()
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			out := encodeReply(call.XID, h(call))
			wmu.Lock()
			defer wmu.Unlock()
			if _, err := c.Write(out); err != nil {
				c.Close()
			}
		}()
	}
}

// readRecord reads one record (its fragments joined), at most MaxRecord bytes.
func readRecord(r io.Reader) ([]byte, error) {
	var rec []byte
	for {
		var hdr [4]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, err
		}
		v := binary.BigEndian.Uint32(hdr[:])
		n := int(v &^ (1 << 31))
		if len(rec)+n > MaxRecord {
			return nil, fmt.Errorf("RPC record of more than %d bytes", MaxRecord)
		}
		start := len(rec)
		rec = append(rec, make([]byte, n)...)
		if _, err := io.ReadFull(r, rec[start:]); err != nil {
			return nil, err
		}
		if v&(1<<31) != 0 {
			return rec, nil
		}
	}
}

func parseCall(rec []byte) (Call, error) {
	r := NewReader(rec)
	xid, typ, rpcv := r.Uint32(), r.Uint32(), r.Uint32()
	prog, vers, proc := r.Uint32(), r.Uint32(), r.Uint32()
	for range 2 { // credentials, verifier
		r.Uint32()
		r.Opaque(400)
	}
	if r.Err() != nil {
		return Call{}, r.Err()
	}
	if typ != 0 || rpcv != 2 {
		return Call{}, errors.New("not an RPC version 2 call")
	}
	return Call{XID: xid, Prog: prog, Vers: vers, Proc: proc, Args: r}, nil
}

func encodeReply(xid uint32, rep Reply) []byte {
	w := &Writer{}
	w.Uint32(0) // record mark, set below
	w.Uint32(xid)
	w.Uint32(1) // REPLY
	w.Uint32(0) // MSG_ACCEPTED
	w.Uint32(0) // verifier AUTH_NONE
	w.Uint32(0)
	w.Uint32(rep.Status)
	switch rep.Status {
	case Success:
		w.b = append(w.b, rep.Results...)
	case ProgMismatch:
		w.Uint32(rep.Low)
		w.Uint32(rep.High)
	}
	binary.BigEndian.PutUint32(w.b, uint32(len(w.b)-4)|1<<31)
	return w.b
}

// Reader decodes XDR; the first error sticks and later reads return zero values.
type Reader struct {
	b   []byte
	err error
}

// NewReader reads b.
func NewReader(b []byte) *Reader { return &Reader{b: b} }

// Err is the first error met.
func (r *Reader) Err() error { return r.err }

func (r *Reader) take(n int) []byte {
	if r.err != nil {
		return nil
	}
	if n < 0 || n > len(r.b) {
		r.err = io.ErrUnexpectedEOF
		return nil
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out
}

// Uint32 reads an unsigned int.
func (r *Reader) Uint32() uint32 {
	b := r.take(4)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}

// Uint64 reads an unsigned hyper.
func (r *Reader) Uint64() uint64 {
	b := r.take(8)
	if b == nil {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

// Bool reads a bool.
func (r *Reader) Bool() bool { return r.Uint32() != 0 }

// Opaque reads variable-length opaque data of at most max bytes.
func (r *Reader) Opaque(max int) []byte {
	n := r.Uint32()
	if r.err == nil && n > uint32(max) {
		r.err = fmt.Errorf("XDR opaque of %d bytes, at most %d", n, max)
		return nil
	}
	b := r.take(int(n))
	r.take((4 - int(n)%4) % 4)
	return b
}

// String reads a string of at most max bytes.
func (r *Reader) String(max int) string { return string(r.Opaque(max)) }

// Writer encodes XDR.
type Writer struct{ b []byte }

// Bytes is what was written.
func (w *Writer) Bytes() []byte { return w.b }

// Uint32 writes an unsigned int.
func (w *Writer) Uint32(v uint32) { w.b = binary.BigEndian.AppendUint32(w.b, v) }

// Uint64 writes an unsigned hyper.
func (w *Writer) Uint64(v uint64) { w.b = binary.BigEndian.AppendUint64(w.b, v) }

// Bool writes a bool.
func (w *Writer) Bool(v bool) {
	if v {
		w.Uint32(1)
	} else {
		w.Uint32(0)
	}
}

// Opaque writes variable-length opaque data.
func (w *Writer) Opaque(b []byte) {
	w.Uint32(uint32(len(b)))
	w.b = append(w.b, b...)
	w.b = append(w.b, make([]byte, (4-len(b)%4)%4)...)
}

// String writes a string.
func (w *Writer) String(s string) { w.Opaque([]byte(s)) }

// Portmapper (RFC 1833, version 2) numbers, which both sides use.
const (
	PmapProg        = 100000
	PmapVers        = 2
	PmapProcNull    = 0
	PmapProcSet     = 1
	PmapProcUnset   = 2
	PmapProcGetport = 3
	ProtoTCP        = 6
	ProtoUDP        = 17
)
