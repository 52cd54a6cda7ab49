package agent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Restore slots: for each template recently restored from, the node keeps one VMM
// launched ahead (vmm.Prestarter) with its scratch disk and guest channel ready. A restore
// start takes it and only loads the device state, saving the VMM's own start-up (~40 ms of
// QEMU initialisation); the slot is refilled in the background. A slot runs no guest code
// and has touched no guest memory, so it holds no sandbox capacity.
const (
	// slotIdle: a template not restored from for this long keeps no slot.
	slotIdle = 10 * time.Minute
	// maxSlots bounds the slots of a node.
	maxSlots = 4
)

// restoreSlots owns the node's restore slots and the record of which templates want one.
type restoreSlots struct {
	templates *templates // a slot is for the template that is current for its key
	vms       *vms
	wake      func() // asks the fill loop for a step
	log       *slog.Logger

	mu    sync.Mutex
	slots map[string]*slot    // by template key hash
	wants map[string]slotWant // by template key hash
}

type slot struct {
	spareVM
	t *template // the template it restores: only a start from this very template takes it
}

// slotWant records a template's recent use, for keeping a slot for it.
type slotWant struct {
	rootDisk   string
	vcpus, mem int
	last       time.Time
	retryAt    time.Time // after a failed launch
}

func newRestoreSlots(ts *templates, m *vms, wake func(), log *slog.Logger) *restoreSlots {
	return &restoreSlots{templates: ts, vms: m, wake: wake, log: log.With("part", "slots"),
		slots: map[string]*slot{}, wants: map[string]slotWant{}}
}

// want notes that a start restored from t (so its next start should find a slot).
func (rs *restoreSlots) want(t *template, rootDisk string, vcpus, mem int) {
	rs.mu.Lock()
	sw := rs.wants[t.hash]
	sw.rootDisk, sw.vcpus, sw.mem, sw.last = rootDisk, vcpus, mem, time.Now()
	rs.wants[t.hash] = sw
	rs.mu.Unlock()
	rs.wake()
}

// take hands over the slot for template t, if there is a live one launched for t itself
// (not for an earlier template under the same key, which was dropped).
func (rs *restoreSlots) take(t *template) *slot {
	if t == nil {
		return nil
	}
	rs.mu.Lock()
	sl := rs.slots[t.hash]
	delete(rs.slots, t.hash)
	rs.mu.Unlock()
	if sl != nil && (sl.t != t || isClosed(sl.h.vm.Wait())) {
		sl.destroy()
		return nil
	}
	return sl
}

// step keeps the slots: drops idle or dead ones and launches one missing slot. It
// reports whether it did any launching.
func (rs *restoreSlots) step(ctx context.Context) bool {
	now := time.Now()
	var drop []*slot
	var (
		t    *template
		want slotWant
	)
	rs.mu.Lock()
	for hash, sw := range rs.wants {
		sl := rs.slots[hash]
		tm := rs.templates.current(hash)
		if sl != nil && sl.t != tm {
			// Its template was dropped (and maybe rebuilt under the same key).
			drop = append(drop, sl)
			delete(rs.slots, hash)
			sl = nil
		}
		if now.Sub(sw.last) > slotIdle || tm == nil {
			delete(rs.wants, hash)
			if sl != nil {
				drop = append(drop, sl)
				delete(rs.slots, hash)
			}
			continue
		}
		if sl != nil && isClosed(sl.h.vm.Wait()) {
			drop = append(drop, sl)
			delete(rs.slots, hash)
			sl = nil
		}
		if sl == nil && t == nil && len(rs.slots) < maxSlots && !now.Before(sw.retryAt) && rs.templates.hold(tm) {
			t, want = tm, sw // held until its files are open in the new VMM
		}
	}
	rs.mu.Unlock()
	for _, sl := range drop {
		sl.destroy()
	}
	if t == nil {
		return false
	}
	defer rs.templates.release(t)
	dir := filepath.Join(rs.vms.runRoot, "s-"+randHex(6))
	h, err := rs.vms.prepareVM(ctx, vmInput{id: filepath.Base(dir), dir: dir, rootDisk: want.rootDisk, vcpus: want.vcpus, mem: want.mem, tmpl: t,
		net: t.key.withNet(), closedNet: true}, true)
	if err != nil {
		_ = os.RemoveAll(dir)
		rs.log.Warn("launch a VMM ahead of restores", "key", t.hash, "err", err)
		rs.mu.Lock()
		if sw, ok := rs.wants[t.hash]; ok {
			sw.retryAt = time.Now().Add(fillRetry)
			rs.wants[t.hash] = sw
		}
		rs.mu.Unlock()
		return false
	}
	sl := &slot{spareVM: spareVM{dir: dir, h: h}, t: t}
	rs.mu.Lock()
	// Only for the template as it stands: one dropped meanwhile gets no slot.
	if rs.slots[t.hash] == nil && rs.templates.current(t.hash) == t && ctx.Err() == nil {
		rs.slots[t.hash] = sl
		sl = nil
	}
	rs.mu.Unlock()
	if sl != nil {
		sl.destroy()
	}
	return true
}

// drop ends the slot of a template (it was dropped) or, for "", every slot.
func (rs *restoreSlots) drop(hash string) {
	rs.mu.Lock()
	var drop []*slot
	for h, sl := range rs.slots {
		if hash == "" || h == hash {
			drop = append(drop, sl)
			delete(rs.slots, h)
		}
	}
	rs.mu.Unlock()
	for _, sl := range drop {
		sl.destroy()
	}
}
