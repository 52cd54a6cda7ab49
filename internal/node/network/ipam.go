// Package network gives sandboxes their own network: addresses from the node's range
// (IPAM) and, per sandbox, a network namespace wired to the host by a veth pair with a tap
// for the guest. Policy (eBPF) and NAT build on it.
package network

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
)

// ErrExhausted means the node's range has no free block left.
var ErrExhausted = errors.New("no free addresses left in the node's range")

// Block is one sandbox's /30: the host end of its veth pair, and the sandbox's address.
type Block struct {
	Prefix netip.Prefix `json:"prefix"` // the /30
}

// Host is the host side's address (the first usable one): the sandbox's gateway.
func (b Block) Host() netip.Addr { return b.Prefix.Addr().Next() }

// Sandbox is the sandbox side's address (the second usable one).
func (b Block) Sandbox() netip.Addr { return b.Host().Next() }

// IPAM hands out /30 blocks of a node's IPv4 range to sandboxes by owner (sandbox ID).
// Every allocation is written to disk before it is returned, so an agent restart never
// hands out a block twice, and an owner asking again gets the block it has.
type IPAM struct {
	path   string
	prefix netip.Prefix

	mu     sync.Mutex
	owners map[string]netip.Prefix // owner -> block
	used   map[netip.Prefix]string // block -> owner
	next   uint32                  // index of the block to try first (round robin: a freed block is reused last)
}

type ipamFile struct {
	Range  netip.Prefix            `json:"range"`
	Next   uint32                  `json:"next"`
	Owners map[string]netip.Prefix `json:"owners"`
}

// OpenIPAM opens (or creates) the allocation file at path for the IPv4 range rng, which
// must hold at least one /30. A file written for another range is refused: moving a
// node's range under running sandboxes would hand out their addresses again.
func OpenIPAM(path string, rng netip.Prefix) (*IPAM, error) {
	rng = rng.Masked()
	if !rng.Addr().Is4() || rng.Bits() > 30 {
		return nil, fmt.Errorf("sandbox address range %s: want an IPv4 prefix of /30 or wider", rng)
	}
	m := &IPAM{path: path, prefix: rng, owners: map[string]netip.Prefix{}, used: map[netip.Prefix]string{}}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return m, m.saveLocked()
	case err != nil:
		return nil, fmt.Errorf("read address allocations %s: %w", path, err)
	}
	var f ipamFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("address allocations %s are damaged: %w", path, err)
	}
	if f.Range != rng {
		return nil, fmt.Errorf("address allocations %s are for range %s, not %s (remove the file only when no sandbox runs)", path, f.Range, rng)
	}
	for owner, p := range f.Owners {
		if !rng.Contains(p.Addr()) || p.Bits() != 30 || p.Masked() != p {
			return nil, fmt.Errorf("address allocations %s: %s holds %s, which is not a /30 of %s", path, owner, p, rng)
		}
		if other, dup := m.used[p]; dup {
			return nil, fmt.Errorf("address allocations %s: %s is held by both %s and %s", path, p, other, owner)
		}
		m.owners[owner], m.used[p] = p, owner
	}
	m.next = f.Next
	return m, nil
}

func (m *IPAM) blocks() uint32 { return 1 << (30 - m.prefix.Bits()) }

func (m *IPAM) block(i uint32) netip.Prefix {
	base := binary.BigEndian.Uint32(m.prefix.Addr().AsSlice())
	var a [4]byte
	binary.BigEndian.PutUint32(a[:], base+4*i)
	return netip.PrefixFrom(netip.AddrFrom4(a), 30)
}

// Allocate returns owner's block, allocating a free one if it has none.
func (m *IPAM) Allocate(owner string) (Block, error) {
	if owner == "" {
		return Block{}, errors.New("allocate addresses: no owner given")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if p, ok := m.owners[owner]; ok {
		return Block{Prefix: p}, nil
	}
	n := m.blocks()
	for k := uint32(0); k < n; k++ {
		i := (m.next + k) % n
		p := m.block(i)
		if _, taken := m.used[p]; taken {
			continue
		}
		m.owners[owner], m.used[p] = p, owner
		m.next = (i + 1) % n
		if err := m.saveLocked(); err != nil {
			delete(m.owners, owner)
			delete(m.used, p)
			return Block{}, err
		}
		return Block{Prefix: p}, nil
	}
	return Block{}, fmt.Errorf("allocate addresses for %s in %s: %w", owner, m.prefix, ErrExhausted)
}

// Release frees owner's block (no-op if it has none).
func (m *IPAM) Release(owner string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	p, ok := m.owners[owner]
	if !ok {
		return nil
	}
	delete(m.owners, owner)
	delete(m.used, p)
	if err := m.saveLocked(); err != nil {
		m.owners[owner], m.used[p] = p, owner
		return err
	}
	return nil
}

// Owners lists the owners holding blocks, sorted.
func (m *IPAM) Owners() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]string, 0, len(m.owners))
	for o := range m.owners {
		out = append(out, o)
	}
	slices.Sort(out)
	return out
}

// saveLocked writes the allocations atomically (temp file, fsync, rename).
func (m *IPAM) saveLocked() error {
	b, err := json.MarshalIndent(ipamFile{Range: m.prefix, Next: m.next, Owners: m.owners}, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(m.path), 0o700); err != nil {
		return fmt.Errorf("save address allocations: %w", err)
	}
	tmp := m.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("save address allocations: %w", err)
	}
	_, werr := f.Write(b)
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		return fmt.Errorf("save address allocations %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, m.path); err != nil {
		return fmt.Errorf("save address allocations: %w", err)
	}
	return nil
}
