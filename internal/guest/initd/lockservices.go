package initd

import (
	"fmt"
	"net"
	"sync"

	"github.com/fireworks-sandbox/fireworks/internal/shared/sunrpc"
)

// The guest kernel's NFSv3 client takes file locks through the node's lock manager
// (NLM), and before its first lock it asks two local services that a distribution runs
// as daemons: the portmapper (rpcbind, where the kernel's lock daemon registers itself
// and where it looks up the status monitor) and the status monitor (rpc.statd, which
// would tell peers that this host rebooted). No image need have them: init answers both
// on the guest's loopback, in its own process, once the first volume is mounted.

// Status monitor (NSM, program 100024 version 1) procedures.
const (
	smProg      = 100024
	smVers      = 1
	smProcNull  = 0
	smProcStat  = 1
	smProcMon   = 2
	smProcUnmon = 3
	smProcUnAll = 4
	smProcCrash = 5
	smProcNote  = 6
)

// lockServices is the portmapper and status monitor of this guest.
type lockServices struct {
	mu    sync.Mutex
	ports map[[3]uint32]uint32 // (program, version, protocol) → port
}

// startLockServices listens on the loopback: the portmapper on its well-known port, the
// status monitor anywhere (registered with the portmapper).
func startLockServices() (*lockServices, error) {
	pm, err := net.Listen("tcp4", "127.0.0.1:111")
	if err != nil {
		return nil, fmt.Errorf("portmapper for volume locks: %w", err)
	}
	sm, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		pm.Close()
		return nil, fmt.Errorf("status monitor for volume locks: %w", err)
	}
	ls := &lockServices{ports: map[[3]uint32]uint32{}}
	ls.ports[[3]uint32{smProg, smVers, sunrpc.ProtoTCP}] = uint32(sm.Addr().(*net.TCPAddr).Port)
	go func() { _ = sunrpc.Serve(pm, ls.portmapper) }() // as long as init lives
	go func() { _ = sunrpc.Serve(sm, statusMonitor) }()
	return ls, nil
}

// portmapper answers version 2 calls: the kernel registers its lock daemon (SET, UNSET)
// and looks up the status monitor (GETPORT).
func (ls *lockServices) portmapper(c sunrpc.Call) sunrpc.Reply {
	if c.Prog != sunrpc.PmapProg {
		return sunrpc.Reply{Status: sunrpc.ProgUnavail}
	}
	if c.Vers != sunrpc.PmapVers {
		return sunrpc.Reply{Status: sunrpc.ProgMismatch, Low: sunrpc.PmapVers, High: sunrpc.PmapVers}
	}
	w := &sunrpc.Writer{}
	switch c.Proc {
	case sunrpc.PmapProcNull:
	case sunrpc.PmapProcSet, sunrpc.PmapProcUnset, sunrpc.PmapProcGetport:
		key := [3]uint32{c.Args.Uint32(), c.Args.Uint32(), c.Args.Uint32()}
		port := c.Args.Uint32()
		if c.Args.Err() != nil {
			return sunrpc.Reply{Status: sunrpc.GarbageArgs}
		}
		if c.Proc != sunrpc.PmapProcGetport && !reservedPort(c.Remote) {
			// Only the kernel (from a reserved port) registers services: no guest process
			// may point its lock daemon elsewhere.
			w.Bool(false)
			return sunrpc.Reply{Results: w.Bytes()}
		}
		ls.mu.Lock()
		switch c.Proc {
		case sunrpc.PmapProcSet:
			if len(ls.ports) < 256 {
				ls.ports[key] = port
			}
			w.Bool(len(ls.ports) < 256 || ls.ports[key] == port)
		case sunrpc.PmapProcUnset:
			for k := range ls.ports {
				if k[0] == key[0] && k[1] == key[1] {
					delete(ls.ports, k)
				}
			}
			w.Bool(true)
		default:
			w.Uint32(ls.ports[key])
		}
		ls.mu.Unlock()
	default:
		return sunrpc.Reply{Status: sunrpc.ProcUnavail}
	}
	return sunrpc.Reply{Results: w.Bytes()}
}

// reservedPort says a (loopback TCP) peer sends from a port below 1024, which only the
// kernel and root bind.
func reservedPort(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.Port > 0 && t.Port < 1024
}

// statusMonitor says yes to the kernel's monitor requests: a guest's locks live as long
// as its volume server's connection (see the volume package), so there is no peer to
// tell of a reboot.
func statusMonitor(c sunrpc.Call) sunrpc.Reply {
	if c.Prog != smProg {
		return sunrpc.Reply{Status: sunrpc.ProgUnavail}
	}
	if c.Vers != smVers {
		return sunrpc.Reply{Status: sunrpc.ProgMismatch, Low: smVers, High: smVers}
	}
	const state = 1 // odd: up
	w := &sunrpc.Writer{}
	switch c.Proc {
	case smProcNull, smProcCrash, smProcNote:
	case smProcStat, smProcMon:
		w.Uint32(0) // STAT_SUCC
		w.Uint32(state)
	case smProcUnmon, smProcUnAll:
		w.Uint32(state)
	default:
		return sunrpc.Reply{Status: sunrpc.ProcUnavail}
	}
	return sunrpc.Reply{Results: w.Bytes()}
}
