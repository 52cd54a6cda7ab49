package cluster

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/anishathalye/porcupine"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
	"github.com/fireworks-sandbox/fireworks/internal/shared/client"
)

// The API is linearizable under faults: clients create, stop, inspect and list
// sandboxes and set and read warm pools, through all three servers, while a nemesis
// kills the leader and followers (kill -9) and restarts them, cuts a server off and cuts
// two servers apart (nftables, the third reaching both). The history is checked with
// porcupine; a history that is not linearizable is printed, key by key, with the faults.
//
// The sandboxes wait for a node label nobody has, so they stay pending until stopped:
// what is checked is the servers' state, not the nodes'.
func TestLinearizableUnderFaults(t *testing.T) {
	need(t)
	const (
		clients  = 8
		runFor   = 30 * time.Second
		keySpan  = 4               // keys a client picks among at a time
		keyEvery = 2 * time.Second // a new key enters the window this often
	)
	run := fmt.Sprintf("lin%d", time.Now().Unix()%100000)
	h := &history{start: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), runFor)
	defer cancel()

	var servers []string
	for _, s := range w.servers {
		servers = append(servers, s.h.IP+":"+apiPort)
	}
	newClient := func(i int) *client.Client {
		// Each client starts with a server of its own and fails over to the others.
		order := append(slices.Clone(servers[i%3:]), servers[:i%3]...)
		c, err := client.New(client.Config{Server: "https://" + strings.Join(order, ","), CA: filepath.Join(w.caDir, "ca.pem"),
			Token: w.token, RequestTimeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	keyName := func(k int) string { return fmt.Sprintf("%s-k%d", run, k) }
	poolImage := func(k int) string { return fmt.Sprintf("lin.invalid/%s-pool%d:1", run, k) }

	var wg sync.WaitGroup
	for ci := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := newClient(ci)
			rng := rand.New(rand.NewPCG(uint64(ci), uint64(time.Now().UnixNano())))
			for ctx.Err() == nil {
				first := int(time.Since(h.start) / keyEvery)
				k := first + rng.IntN(keySpan)
				h.maxKey(k)
				// Every call has its own deadline (the client's), not the run's: a call
				// the run's end cut short would be an unknown outcome for no fault.
				cctx := context.WithoutCancel(ctx)
				switch op := rng.IntN(10); {
				case op < 3:
					h.do(ci, linInput{Op: "create", Key: keyName(k)}, func() linOutput {
						_, err := c.Sandboxes.CreateSandbox(cctx, connect.NewRequest(&pb.CreateSandboxRequest{Name: keyName(k),
							Spec: &pb.SandboxSpec{Image: image(), Cmd: []string{"true"}, Constraints: []string{"nosuch==x"}}}))
						return writeOutcome(err, connect.CodeAlreadyExists)
					})
				case op < 5:
					h.do(ci, linInput{Op: "stop", Key: keyName(k)}, func() linOutput {
						_, err := c.Sandboxes.StopSandbox(cctx, connect.NewRequest(&pb.StopSandboxRequest{Sandbox: keyName(k)}))
						return writeOutcome(err, connect.CodeNotFound)
					})
				case op < 7:
					h.do(ci, linInput{Op: "inspect", Key: keyName(k)}, func() linOutput {
						r, err := c.Sandboxes.GetSandbox(cctx, connect.NewRequest(&pb.GetSandboxRequest{Sandbox: keyName(k)}))
						if connect.CodeOf(err) == connect.CodeNotFound {
							return linOutput{Value: 0}
						}
						if err != nil {
							return linOutput{Unknown: true, Err: err.Error()}
						}
						return linOutput{Value: sandboxValue(r.Msg.GetSandbox().GetStatus())}
					})
				case op < 8:
					h.list(ci, run, keyName, func() (map[string]string, error) { return statusesByName(cctx, c) })
				case op < 9:
					size := rng.IntN(3)
					pk := rng.IntN(3)
					h.do(ci, linInput{Op: "pool-set", Key: poolImage(pk), Value: size}, func() linOutput {
						_, err := c.Images.SetPool(cctx, connect.NewRequest(&pb.SetPoolRequest{Pool: &pb.Pool{Image: poolImage(pk), Size: int32(size)}}))
						return writeOutcome(err)
					})
				default:
					pk := rng.IntN(3)
					h.do(ci, linInput{Op: "pool-get", Key: poolImage(pk)}, func() linOutput {
						r, err := c.Images.ListPools(cctx, connect.NewRequest(&pb.ListPoolsRequest{}))
						if err != nil {
							return linOutput{Unknown: true, Err: err.Error()}
						}
						for _, p := range r.Msg.GetPools() {
							if p.GetImage() == poolImage(pk) {
								return linOutput{Value: int(p.GetSize())}
							}
						}
						return linOutput{Value: 0}
					})
				}
			}
		}()
	}

	nemesis(ctx, t, h)
	wg.Wait()
	heal(t)
	if err := w.waitAPI(time.Minute); err != nil {
		t.Fatal(err)
	}
	// Final reads once healed: whatever a lost answer left is visible now.
	c := newClient(0)
	h.list(clients, run, keyName, func() (map[string]string, error) { return statusesByName(context.Background(), c) })

	ops, counts := h.operations()
	t.Logf("history: %s; faults: %s", counts, strings.Join(h.faultList(), ", "))
	if h.ok < 100 || len(h.faults) < 3 {
		t.Errorf("the run proved little: %d answered operations, %d faults", h.ok, len(h.faults))
	}
	res, info := porcupine.CheckOperationsVerbose(linModel, ops, time.Minute)
	switch res {
	case porcupine.Ok:
	case porcupine.Unknown:
		t.Errorf("the linearizability check did not finish within a minute (%d operations)", len(ops))
	default:
		path := filepath.Join(w.root, "linearizability.html")
		_ = porcupine.VisualizePath(linModel, info, path)
		t.Errorf("the history is not linearizable (visualized in %s):\n%s", path, h.describeFailure(ops, info))
	}

	// Clean up: pools off, the run's sandboxes removed.
	for pk := range 3 {
		_, _ = c.Images.DeletePool(context.Background(), connect.NewRequest(&pb.DeletePoolRequest{Image: poolImage(pk)}))
	}
	for k := range h.maxKeyIssued() + 1 {
		_, _ = c.Sandboxes.RemoveSandbox(context.Background(), connect.NewRequest(&pb.RemoveSandboxRequest{Sandbox: keyName(k), Force: true}))
	}
}

// statusesByName lists every sandbox's status by name.
func statusesByName(ctx context.Context, c *client.Client) (map[string]string, error) {
	r, err := c.Sandboxes.ListSandboxes(ctx, connect.NewRequest(&pb.ListSandboxesRequest{All: true}))
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, sb := range r.Msg.GetSandboxes() {
		m[sb.GetName()] = sb.GetStatus()
	}
	return m, nil
}

// linInput is one operation on one key (a sandbox name or a pool's image).
type linInput struct {
	Op    string // create, stop, inspect (read), pool-set, pool-get (read)
	Key   string
	Value int // pool-set: the size
}

// linOutput is what the call answered: a value (reads: 0 absent, 1 pending, 2 ended; a
// pool's size), a definite refusal (Refused: exists, not found), or no answer (Unknown:
// the call may or may not have taken effect).
type linOutput struct {
	Value   int
	Refused bool
	Unknown bool
	Err     string
}

// sandboxValue is a status as the model sees it: pending, or ended.
func sandboxValue(status string) int {
	if status == "pending" {
		return 1
	}
	return 2
}

// writeOutcome classifies a write's error: nil is done, a definite code a refusal, and
// anything else (unavailable, a timeout, a dropped connection) an unknown outcome.
func writeOutcome(err error, definite ...connect.Code) linOutput {
	if err == nil {
		return linOutput{}
	}
	if slices.Contains(definite, connect.CodeOf(err)) {
		return linOutput{Refused: true, Err: err.Error()}
	}
	return linOutput{Unknown: true, Err: err.Error()}
}

// linModel: each key is independent. A sandbox key goes absent (0) → pending (1) on
// create, pending → ended (2) on stop; a create of an existing one and a stop of a
// missing one are refused. A pool key is a register. An unknown outcome may or may not
// have taken effect.
var linModel = (&porcupine.NondeterministicModel{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		by := map[string][]porcupine.Operation{}
		var keys []string
		for _, op := range history {
			k := op.Input.(linInput).Key
			if _, ok := by[k]; !ok {
				keys = append(keys, k)
			}
			by[k] = append(by[k], op)
		}
		var out [][]porcupine.Operation
		for _, k := range keys {
			out = append(out, by[k])
		}
		return out
	},
	Init:  func() []any { return []any{0} },
	Step:  linSteps,
	Equal: func(a, b any) bool { return a == b },
	DescribeOperation: func(input, output any) string {
		return describeOp(input.(linInput), output.(linOutput))
	},
	DescribeState: func(state any) string { return fmt.Sprint(state) },
}).ToModel()

// linSteps is the model's step: the states state can become by the operation.
func linSteps(state, input, output any) []any {
	s, in, out := state.(int), input.(linInput), output.(linOutput)
	switch in.Op {
	case "inspect", "pool-get":
		if out.Value == s {
			return []any{s}
		}
		return nil
	case "create":
		switch {
		case out.Unknown && s == 0:
			return []any{0, 1}
		case out.Unknown:
			return []any{s}
		case out.Refused && s != 0, !out.Refused && s == 0:
			return []any{max(s, 1)}
		}
		return nil
	case "stop":
		switch {
		case out.Unknown && s == 1:
			return []any{1, 2}
		case out.Unknown:
			return []any{s}
		case out.Refused && s == 0:
			return []any{0}
		case !out.Refused && s != 0:
			return []any{2}
		}
		return nil
	case "pool-set":
		if out.Unknown {
			return []any{s, in.Value}
		}
		return []any{in.Value}
	}
	return nil
}

func describeOp(in linInput, out linOutput) string {
	arg := ""
	if in.Op == "pool-set" {
		arg = fmt.Sprintf(", %d", in.Value)
	}
	res := fmt.Sprint(out.Value)
	switch {
	case out.Unknown:
		res = "unknown (" + firstLine(out.Err) + ")"
	case out.Refused:
		res = "refused (" + firstLine(out.Err) + ")"
	case in.Op == "create" || in.Op == "stop" || in.Op == "pool-set":
		res = "ok"
	case in.Op == "inspect":
		res = []string{"absent", "pending", "ended"}[out.Value]
	}
	return fmt.Sprintf("%s(%s%s) → %s", in.Op, in.Key, arg, res)
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > 100 {
		s = s[:100] + "..."
	}
	return s
}

// history records operations and faults as they happen.
type history struct {
	start  time.Time
	mu     sync.Mutex
	ops    []porcupine.Operation
	faults []fault
	ok     int
	topKey int
}

type fault struct {
	at, until time.Duration
	what      string
}

func (h *history) now() int64 { return int64(time.Since(h.start)) }

func (h *history) maxKey(k int) {
	h.mu.Lock()
	h.topKey = max(h.topKey, k)
	h.mu.Unlock()
}

func (h *history) maxKeyIssued() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.topKey
}

// do runs call as client ci's operation in.
func (h *history) do(ci int, in linInput, call func() linOutput) {
	begin := h.now()
	out := call()
	end := h.now()
	isRead := in.Op == "inspect" || in.Op == "pool-get"
	if out.Unknown && isRead {
		return // a read that got no answer constrains nothing
	}
	if out.Unknown {
		end = math.MaxInt64 // it may take effect at any time from its call on
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ops = append(h.ops, porcupine.Operation{ClientId: ci, Input: in, Call: begin, Output: out, Return: end})
	if !out.Unknown {
		h.ok++
	}
}

// list records one list call as a read of every key issued so far, all over its
// interval (which makes the check per key, not of the list's atomicity across keys).
func (h *history) list(ci int, run string, keyName func(int) string, call func() (map[string]string, error)) {
	top := h.maxKeyIssued()
	begin := h.now()
	m, err := call()
	end := h.now()
	if err != nil {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for k := range top + 1 {
		v := 0
		if st, ok := m[keyName(k)]; ok {
			v = sandboxValue(st)
		}
		h.ops = append(h.ops, porcupine.Operation{ClientId: ci, Input: linInput{Op: "inspect", Key: keyName(k)}, Call: begin, Output: linOutput{Value: v}, Return: end})
	}
	h.ok++
}

func (h *history) fault(at time.Duration, what string) {
	h.mu.Lock()
	h.faults = append(h.faults, fault{at: at, until: time.Since(h.start), what: what})
	h.mu.Unlock()
}

func (h *history) faultList() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for _, f := range h.faults {
		out = append(out, fmt.Sprintf("%s (%.1fs–%.1fs)", f.what, f.at.Seconds(), f.until.Seconds()))
	}
	return out
}

func (h *history) operations() ([]porcupine.Operation, string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := map[string]int{}
	unknown := 0
	for _, op := range h.ops {
		n[op.Input.(linInput).Op]++
		if op.Output.(linOutput).Unknown {
			unknown++
		}
	}
	return slices.Clone(h.ops), fmt.Sprintf("%d operations (%v), %d with unknown outcome", len(h.ops), n, unknown)
}

// describeFailure prints, for each key whose history has no linearization, where it
// breaks: the longest order of its operations the checker could linearize, the state
// that order leaves, and the operations around the first one that cannot follow it
// (marked >>), in call order beside the faults.
func (h *history) describeFailure(ops []porcupine.Operation, info porcupine.LinearizationInfo) string {
	var b strings.Builder
	sec := func(ns int64) string {
		if ns == math.MaxInt64 {
			return "   never"
		}
		return fmt.Sprintf("%8.3fs", float64(ns)/1e9)
	}
	fmt.Fprintf(&b, "faults: %s\n", strings.Join(h.faultList(), ", "))
	partial := info.PartialLinearizationsOperations()
	for p, part := range linModel.Partition(ops) {
		if porcupine.CheckOperations(linModel, part) {
			continue
		}
		key := part[0].Input.(linInput).Key
		var longest []porcupine.Operation
		if p < len(partial) {
			for _, l := range partial[p] {
				if len(l) > len(longest) {
					longest = l
				}
			}
		}
		// The states the longest order can leave (the model is nondeterministic).
		states := []any{0}
		done := map[[2]int64]bool{}
		for _, op := range longest {
			var next []any
			for _, st := range states {
				next = append(next, linSteps(st, op.Input, op.Output)...)
			}
			states = next
			done[[2]int64{op.Call, int64(op.ClientId)}] = true
		}
		sorted := slices.Clone(part)
		slices.SortFunc(sorted, func(a, b porcupine.Operation) int { return cmp.Compare(a.Call, b.Call) })
		stuck := -1
		for i, op := range sorted {
			if !done[[2]int64{op.Call, int64(op.ClientId)}] {
				stuck = i
				break
			}
		}
		fmt.Fprintf(&b, "\nkey %s: %d operations, no linearization. The longest order found takes %d of them and leaves the key %v (0 absent, 1 pending, 2 ended; a pool's size); the first operation that cannot follow it is marked >>:\n",
			key, len(part), len(longest), states)
		if stuck < 0 {
			stuck = len(sorted) - 1
		}
		for i := max(0, stuck-15); i < min(len(sorted), stuck+15); i++ {
			op := sorted[i]
			mark := "  "
			if i == stuck {
				mark = ">>"
			}
			fmt.Fprintf(&b, "%s %s → %s  client %d  %s\n", mark, sec(op.Call), sec(op.Return), op.ClientId, describeOp(op.Input.(linInput), op.Output.(linOutput)))
		}
	}
	return b.String()
}

// nemesis injects a fault every few seconds until ctx ends, each undone before the next.
func nemesis(ctx context.Context, t *testing.T, h *history) {
	kinds := []func() (string, func()){
		func() (string, func()) { // kill -9 the leader; restart it
			l := leader(t)
			w.stop(w.servers[l], true)
			return fmt.Sprintf("kill -9 leader s%d", l), func() { restartServer(t, l) }
		},
		func() (string, func()) { // kill -9 a follower; restart it
			f := (leader(t) + 1 + rand.IntN(2)) % 3
			w.stop(w.servers[f], true)
			return fmt.Sprintf("kill -9 follower s%d", f), func() { restartServer(t, f) }
		},
		func() (string, func()) { // cut one server off (its link down)
			i := rand.IntN(3)
			veth := w.servers[i].h.Veth
			if err := run("ip", "link", "set", veth, "down"); err != nil {
				t.Error(err)
			}
			return fmt.Sprintf("s%d cut off", i), func() { _ = run("ip", "link", "set", veth, "up") }
		},
		func() (string, func()) { // cut the leader and one follower apart; both reach the third
			l := leader(t)
			f := (l + 1 + rand.IntN(2)) % 3
			if err := dropBetween(w.servers[l], w.servers[f]); err != nil {
				t.Error(err)
			}
			return fmt.Sprintf("leader s%d and s%d cut apart", l, f), func() { undropBetween(w.servers[l]) }
		},
	}
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
		at := time.Since(h.start)
		what, undo := kinds[i%len(kinds)]()
		select {
		case <-ctx.Done():
		case <-time.After(time.Duration(3+rand.IntN(3)) * time.Second):
		}
		undo()
		h.fault(at, what)
	}
}

func restartServer(t *testing.T, i int) {
	if err := w.start(w.servers[i]); err != nil {
		t.Errorf("restart s%d: %v", i, err)
	}
}

// dropBetween makes a's namespace drop everything to and from b (both directions are
// a's rules: b's packets never get an answer, a's never leave).
func dropBetween(a, b *proc) error {
	script := fmt.Sprintf(`table inet fwlin {
	chain in { type filter hook input priority 0; ip saddr %s drop; }
	chain out { type filter hook output priority 0; ip daddr %s drop; }
}`, b.h.IP, b.h.IP)
	f, err := os.CreateTemp("", "fwlin-*.nft")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(script); err != nil {
		return err
	}
	f.Close()
	return run("ip", "netns", "exec", a.h.NS, "nft", "-f", f.Name())
}

func undropBetween(a *proc) {
	_ = run("ip", "netns", "exec", a.h.NS, "nft", "delete", "table", "inet", "fwlin")
}

// heal undoes every fault the nemesis may have left and starts every server that is down.
func heal(t *testing.T) {
	for i, s := range w.servers {
		_ = run("ip", "link", "set", s.h.Veth, "up")
		undropBetween(s)
		select {
		case <-s.exited:
			restartServer(t, i)
		default:
			if s.cmd == nil {
				restartServer(t, i)
			}
		}
	}
}
