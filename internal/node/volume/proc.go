package volume

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	nfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"

	"github.com/fireworks-sandbox/fireworks/internal/node/vmm/jail"
	"github.com/fireworks-sandbox/fireworks/internal/shared/sunrpc"
)

// Export is one volume mount a sandbox's server answers, on a listener of its own.
type Export struct {
	Dir      string `json:"dir"` // the volume's mounted directory on the node
	ReadOnly bool   `json:"read_only,omitempty"`
}

// ServerSpec is one sandbox's volume server: a process of its own, jailed.
type ServerSpec struct {
	// Root is an empty directory for the jail's root.
	Root string `json:"-"`
	// UID and GID are the server's user (never root; see swapID for what guests see).
	UID int `json:"-"`
	GID int `json:"-"`
	// Cgroups are the server's cgroups (made, limits set), joined before it runs.
	Cgroups []string `json:"-"`
	// Binary is the server's program: InstallServer's copy of fireworks-volume-server.
	Binary string `json:"-"`
	// Exports are served on the listeners given to ServerCommand, in order; after them
	// come the portmapper's listener and the lock manager's, on NLMPort.
	Exports []Export `json:"exports"`
	NLMPort uint16   `json:"nlm_port"`
	// Peer is the only address served (the guest's); its calls come from reserved
	// ports (below 1024), as a guest kernel's do: a guest's unprivileged process cannot
	// speak to the server itself (see Admit).
	Peer string `json:"peer,omitempty"`
	// Relayed: the listeners are unix sockets only the agent reaches, relaying the calls
	// of a guest on another node, whose agent admitted them (Admit) before relaying; Peer
	// is then empty.
	Relayed bool `json:"relayed,omitempty"`
}

// Admit says whether a connection from remote may speak to a sandbox's volume server:
// it comes from the guest's address peer and, with reserved, from a reserved port (the
// guest kernel's NFS and lock clients bind one; an unprivileged guest process cannot).
func Admit(remote net.Addr, peer netip.Addr, reserved bool) bool {
	ap, err := netip.ParseAddrPort(remote.String())
	return err == nil && ap.Addr().Unmap() == peer && (!reserved || ap.Port() < 1024)
}

// ServerName names the server's process and marks its command line as a server's (the
// jail passes the program no environment).
const ServerName = "fireworks-volume-server"

// MaxConnsPerExport bounds a mount's connections: a guest's NFS client uses one.
const MaxConnsPerExport = 8

// serverCaps are what the server keeps of root's powers: to reach and change every file
// of its volumes whoever owns it (guests chown), to open files by handle, nothing else.
// Opening by handle reaches any file of the filesystem of any mount the process can
// name, so the jail holds nothing of the node's filesystems: its program is a static
// binary on a filesystem of its own (ServerBinary), and its volumes are whole
// filesystems (each volume's own ext4).
var serverCaps = []uintptr{unix.CAP_CHOWN, unix.CAP_DAC_OVERRIDE, unix.CAP_DAC_READ_SEARCH, unix.CAP_FOWNER, unix.CAP_FSETID}

// ServerCommand returns the command that serves spec's exports, export i on listeners[i],
// the portmapper on the next and the lock manager on the last (TCP listeners the caller
// made in the sandbox's network namespace). The server is spec.Binary (the static
// fireworks-volume-server, on a filesystem of its own: see InstallServer), jailed
// (package jail): as spec's user with only serverCaps, in a mount namespace that holds
// its binary and the volumes it serves (read-only ones bound read-only) and nothing of
// the node's filesystems, in a network namespace with nothing in it (it answers on the
// listeners it was given and can reach nothing), in a PID namespace of its own. A guest
// that found a way to run code in it would hold that and no more. Start it like any
// exec.Cmd; it serves until killed.
func ServerCommand(spec ServerSpec, listeners []*os.File) (*exec.Cmd, error) {
	if len(spec.Exports) == 0 || len(spec.Exports)+2 != len(listeners) || spec.NLMPort == 0 {
		return nil, fmt.Errorf("volume server: %d exports and %d listeners (want one each, the portmapper's and the lock manager's on a port)", len(spec.Exports), len(listeners))
	}
	if spec.Binary == "" {
		return nil, errors.New("volume server: no server binary (fireworks-volume-server, built beside fireworks by `make build`)")
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	mounts := []jail.Mount{{Path: spec.Binary}}
	for _, e := range spec.Exports {
		if !filepath.IsAbs(e.Dir) {
			return nil, fmt.Errorf("volume server: export %q is not an absolute path", e.Dir)
		}
		mounts = append(mounts, jail.Mount{Path: e.Dir, Writable: !e.ReadOnly})
	}
	cmd, err := jail.Command(jail.Spec{Root: spec.Root, UID: spec.UID, GID: spec.GID, Mounts: mounts,
		Caps: serverCaps, Proc: true, NoDevices: true, NoSystem: true, Cgroups: spec.Cgroups, Dir: "/", Path: spec.Binary, Args: []string{ServerName, string(b)}})
	if err != nil {
		return nil, err
	}
	cmd.ExtraFiles = listeners
	return cmd, nil
}

// Main is the jailed server's program (cmd/fireworks-volume-server): it serves the spec
// its command line carries and returns only on failure. It runs only as the first
// process of its PID namespace, started as ServerCommand starts it.
func Main() int {
	if len(os.Args) != 2 || os.Args[0] != ServerName || os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "fireworks-volume-server: runs only jailed, started by a Fireworks agent for a sandbox's volumes")
		return 2
	}
	err := serveExports(os.Args[1])
	fmt.Fprintf(os.Stderr, "fireworks volume server: %v\n", err)
	return 1
}

// serveExports is the jailed server's life: it returns only on failure.
func serveExports(specJSON string) error {
	var spec ServerSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		return fmt.Errorf("read the spec: %w", err)
	}
	unix.Umask(0) // modes are the clients' to give
	// A guest's failing calls (a full volume, a name that is not there) are its own
	// business, and each would be a line in a log on the node's disk.
	nfs.Log.SetLevel(nfs.PanicLevel)
	errc := make(chan error, len(spec.Exports)+2)
	var servers []*Server
	var peer netip.Addr
	var err error
	if !spec.Relayed {
		if peer, err = netip.ParseAddr(spec.Peer); err != nil {
			return fmt.Errorf("peer %q: %w", spec.Peer, err)
		}
	}
	listener := func(i int, reserved bool) (net.Listener, error) {
		f := os.NewFile(uintptr(3+i), fmt.Sprintf("listener-%d", i))
		defer f.Close()
		ln, err := net.FileListener(f)
		if err != nil {
			return nil, fmt.Errorf("listener %d: %w", i, err)
		}
		return &limited{Listener: ln, sem: make(chan struct{}, MaxConnsPerExport), peer: peer, reserved: reserved, relayed: spec.Relayed}, nil
	}
	for i, e := range spec.Exports {
		ln, err := listener(i, true)
		if err != nil {
			return err
		}
		srv, err := NewServer(e.Dir, e.ReadOnly)
		if err != nil {
			return err
		}
		srv.export = uint32(i)
		servers = append(servers, srv)
		go func() { errc <- srv.Serve(ln) }()
	}
	// The guest kernel asks the portmapper from any port (its rpcbind client does not
	// bind a reserved one); the portmapper only answers where the lock manager is.
	pm, err := listener(len(spec.Exports), false)
	if err != nil {
		return err
	}
	nlm, err := listener(len(spec.Exports)+1, true)
	if err != nil {
		return err
	}
	locks := newLockManager(servers)
	go func() { errc <- sunrpc.Serve(pm, portmapper(uint32(spec.NLMPort))) }()
	go func() { errc <- sunrpc.Serve(nlm, locks.serve) }()
	err = <-errc
	for _, s := range servers {
		s.Close()
	}
	if err == nil {
		err = errors.New("a listener closed")
	}
	return err
}

// limited accepts at most cap(sem) connections at a time (more wait in the backlog),
// from peer only, and with reserved from its reserved ports only (others are closed at
// once); relayed, from the agent's relay, which admitted them.
type limited struct {
	net.Listener
	sem      chan struct{}
	peer     netip.Addr
	reserved bool
	relayed  bool
}

func (l *limited) Accept() (net.Conn, error) {
	l.sem <- struct{}{}
	var c net.Conn
	for {
		var err error
		if c, err = l.Listener.Accept(); err != nil {
			<-l.sem
			return nil, err
		}
		if l.relayed || Admit(c.RemoteAddr(), l.peer, l.reserved) {
			break
		}
		c.Close()
	}
	return &limitedConn{Conn: c, release: func() { <-l.sem }, rec: recordBound{max: maxFragment}}, nil
}

// maxFragment bounds one RPC record fragment from a guest: a WRITE of the client's
// largest size (1 MiB, the server's wtmax) and its header. go-nfs allocates what a
// request's lengths say before it reads the data; a fragment that cannot be larger than
// this is what bounds what one request can make it hold (it reads one request at a time
// per connection, and a connection count is bounded).
const maxFragment = 1<<20 + 64<<10

// recordBound follows the record marks of an RPC stream as it is read and fails the
// read that would start a fragment longer than max.
type recordBound struct {
	max     uint32
	left    uint32 // bytes of the current fragment not yet read
	hdr     [4]byte
	hdrHave int
}

// check passes b, just read, through the record marks.
func (r *recordBound) check(b []byte) error {
	for len(b) > 0 {
		if r.left > 0 {
			n := min(uint32(len(b)), r.left)
			r.left -= n
			b = b[n:]
			continue
		}
		n := copy(r.hdr[r.hdrHave:], b)
		r.hdrHave += n
		b = b[n:]
		if r.hdrHave < 4 {
			return nil
		}
		r.hdrHave = 0
		size := (uint32(r.hdr[0])<<24 | uint32(r.hdr[1])<<16 | uint32(r.hdr[2])<<8 | uint32(r.hdr[3])) &^ (1 << 31)
		if size > r.max {
			return fmt.Errorf("RPC fragment of %d bytes, at most %d", size, r.max)
		}
		r.left = size
	}
	return nil
}

type limitedConn struct {
	net.Conn
	once    sync.Once
	release func()
	rec     recordBound
}

func (c *limitedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if cerr := c.rec.check(b[:n]); cerr != nil {
		c.Close()
		return 0, cerr
	}
	return n, err
}

func (c *limitedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
