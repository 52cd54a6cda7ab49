package cli

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/fireworks-sandbox/fireworks/internal/shared/api/fireworksv1"
)

// Runtime detail keys the node writes about how it started a sandbox.
const (
	detailStartMode   = "start_mode"   // cold, restore or warm
	detailStartPhases = "start_phases" // "pull=3ms template=0ms restore=180ms ..."
)

// startSummary says how a sandbox started, e.g. "warm pool (pull=0s restore=2ms ...)";
// "" when the node has not said (yet).
func startSummary(details map[string]string) string {
	mode, phases := details[detailStartMode], details[detailStartPhases]
	if mode == "" && phases == "" {
		return ""
	}
	label := map[string]string{"cold": "cold boot", "restore": "template snapshot restore", "warm": "warm pool"}[mode]
	if label == "" {
		label = mode
	}
	if phases == "" {
		return label
	}
	if label == "" {
		return "(" + phases + ")"
	}
	return label + " (" + phases + ")"
}

// writeSandboxText is `inspect --format text`: the record for a person, how it started
// first. Text that may come from inside the guest goes through printable.
func writeSandboxText(w io.Writer, sb *pb.Sandbox) {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, printable(v))
		}
	}
	row("ID", sb.GetId())
	row("Name", sb.GetName())
	img := sb.GetSpec().GetImage()
	if d := sb.GetImageDigest(); d != "" {
		img += " (" + d + ")"
	}
	row("Image", img)
	status := sb.GetStatus()
	if status == "exited" || (status == "failed" && sb.GetExitCode() != 0) {
		// A sandbox that failed before its command ended has no exit code of its own.
		status += fmt.Sprintf(" (exit code %d)", sb.GetExitCode())
	}
	if r := sb.GetReason(); r != "" {
		status += ": " + r
	}
	row("Status", status)
	if g := sb.GetGroup(); g != nil {
		var ms []string
		for _, m := range g.GetMembers() {
			me := ""
			if m.GetId() == sb.GetId() {
				me = ", this one"
			}
			check := ""
			if r := m.GetReady(); r != "" {
				check = ", ready " + r
			}
			ms = append(ms, fmt.Sprintf("%s (%s%s%s)", m.GetName(), short(m.GetId()), check, me))
		}
		row("Group", strings.Join(ms, "; "))
	}
	if sv := sb.GetSaved(); sv != nil {
		row("Saved state", fmt.Sprintf("%.1f MiB on node %s, taken %s", float64(sv.GetBytes())/(1<<20), sv.GetNode(), tsText(sv.GetAt())))
	}
	if n := sb.GetResumes(); n > 0 {
		row("Resumes", fmt.Sprint(n))
	}
	if m := sb.GetMigration(); m != nil {
		row("Migrating", migrationRow(m))
	}
	for _, m := range sb.GetMigrations() {
		row("Migration", migrationRow(m))
	}
	row("Started", startSummary(sb.GetDetails()))
	row("Boot", sb.GetSpec().GetBoot())
	node := sb.GetNode()
	if a := sb.GetAccel(); a != "" {
		node += " (accel " + a + ")"
	}
	row("Node", node)
	row("Command", strings.Join(sb.GetSpec().GetCmd(), " "))
	row("Created at", tsText(sb.GetCreatedAt()))
	row("Running since", tsText(sb.GetStartedAt()))
	row("Finished at", tsText(sb.GetFinishedAt()))
	if end := sb.GetEndAt(); end != nil {
		how := "stop"
		if sb.GetSpec().GetOnEnd() == "pause" {
			how = "pause"
		}
		row("Lifetime ends", tsText(end)+" ("+how+")")
	}
	if sb.GetSpec().GetTemplate() != "" {
		row("Template", sb.GetSpec().GetTemplate())
	}
	if m := sb.GetSpec().GetMetadata(); len(m) > 0 {
		var kv []string
		for _, k := range slices.Sorted(maps.Keys(m)) {
			kv = append(kv, k+"="+m[k])
		}
		row("Metadata", strings.Join(kv, ", "))
	}
	// The restart policy's verdict, when the control plane gave up on the sandbox, goes
	// beside the count (the status keeps how it last ended).
	if n, verdict := sb.GetRestarts(), sb.GetDetails()["restart"]; n > 0 || verdict != "" {
		v := fmt.Sprint(n)
		if verdict != "" {
			v += " (" + verdict + ")"
		}
		row("Restarts", v)
	}
	if evs := sb.GetEvents(); len(evs) > 0 {
		fmt.Fprintln(tw, "Events:")
		for _, e := range evs {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", tsText(e.GetTime()), e.GetStatus(), printable(e.GetReason()))
		}
	}
	if n := sb.GetNetwork(); n != nil {
		row("Address", n.GetAddress())
		row("Egress", fmt.Sprintf("%d packets allowed, %d dropped", n.GetEgressAllowed(), n.GetEgressDropped()))
		row("Ingress", fmt.Sprintf("%d packets allowed, %d dropped", n.GetIngressAllowed(), n.GetIngressDropped()))
		row("Spoofed", fmt.Sprintf("%d frames dropped", n.GetSpoofedDropped()))
	} else if sb.GetSpec().GetNetwork() == "none" {
		row("Network", "none")
	}
	var ports []string
	for _, p := range sb.GetSpec().GetPorts() {
		v := fmt.Sprint(p.GetPort())
		if p.GetPublic() {
			v += " (public)"
		}
		ports = append(ports, v)
	}
	row("Ports", strings.Join(ports, ", "))
	var vols []string
	for _, v := range sb.GetSpec().GetVolumes() {
		m := short(v.GetVolume()) + ":" + v.GetPath()
		if v.GetReadOnly() {
			m += ":ro"
		}
		vols = append(vols, printable(m))
	}
	row("Volumes", strings.Join(vols, ", "))
	if d := sb.GetDetails(); len(d) > 0 {
		fmt.Fprintln(tw, "Details:")
		keys := make([]string, 0, len(d))
		for k := range d {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(tw, "  %s\t%s\n", printable(k), printable(d[k]))
		}
	}
	_ = tw.Flush()
}

func tsText(t *timestamppb.Timestamp) string {
	if t == nil {
		return ""
	}
	return t.AsTime().Local().Format(time.RFC3339Nano)
}
