package state

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"
)

// Migration is a live migration of a running sandbox from one node to another (or
// into a fresh VMM on its own node: From == To). While one is in progress
// (Sandbox.Migration) the sandbox runs on From; the target prepares a VM that loads it
// and runs only once it has committed the switch-over here (Update.CommitMigration),
// which moves the sandbox to To in the same write. Ending it (Update.EndMigration: the
// source resumes) and committing it exclude each other: whichever is written first
// wins, so never two copies run, and a copy that stopped for the switch-over resumes
// only once the end is written.
type Migration struct {
	ID   string `json:"id"`
	From string `json:"from"`
	To   string `json:"to"`
	// ToAddress is the target node's address, where the source sends the migration
	// (node to node, mutual TLS).
	ToAddress string    `json:"to_address,omitempty"`
	Started   time.Time `json:"started"`
	// Deadline ends a migration not committed by then (the leader writes the end).
	Deadline time.Time `json:"deadline"`
	// What it took, once it ended.
	Ended     time.Time     `json:"ended,omitzero"`
	Outcome   string        `json:"outcome,omitempty"` // MigrationMoved, or why it failed
	Downtime  time.Duration `json:"downtime,omitempty"`
	Bytes     int64         `json:"bytes,omitempty"`
	DiskBytes int64         `json:"disk_bytes,omitempty"`
}

// MigratingTo is the node a migration in progress moves the sandbox to ("" if none).
func (sb Sandbox) MigratingTo() string {
	if sb.Migration == nil {
		return ""
	}
	return sb.Migration.To
}

// MigrationDeadline bounds a live migration from its start to its switch-over: the
// target may have to pull the image first; the source runs on meanwhile. Past it the
// leader ends the migration and the source resumes.
const MigrationDeadline = 5 * time.Minute

// NewMigrationID returns a random migration ID (16 hex characters).
func NewMigrationID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// MigrationMoved is the Outcome of a committed migration.
const MigrationMoved = "moved"

// Took is how long the migration ran (0 while in progress).
func (m Migration) Took() time.Duration {
	if m.Ended.IsZero() {
		return 0
	}
	return m.Ended.Sub(m.Started)
}

// maxMigrations bounds the migrations a sandbox's history keeps (the latest).
const maxMigrations = 8

// MigrationStats, with a commit, are what the migration took as the source measured it.
type MigrationStats struct {
	Downtime  time.Duration `json:"downtime"`
	Bytes     int64         `json:"bytes"`
	DiskBytes int64         `json:"disk_bytes"`
}

// applyMigration applies u's migration fields to sb (see Migration).
func (sb *Sandbox) applyMigration(u Update, t time.Time) error {
	if m := u.StartMigration; m != nil {
		switch {
		case sb.Migration != nil:
			return fmt.Errorf("%w: sandbox is migrating already (%s to %s)", ErrInvalidTransition, sb.Migration.From, sb.Migration.To)
		case sb.Status != StatusRunning:
			return fmt.Errorf("%w: sandbox is %s; only a running sandbox can be migrated", ErrInvalidTransition, sb.Status)
		case !sb.StopRequestedAt.IsZero():
			return fmt.Errorf("%w: sandbox is stopping", ErrInvalidTransition)
		case !sb.PauseRequestedAt.IsZero():
			return fmt.Errorf("%w: sandbox is being paused", ErrInvalidTransition)
		case m.ID == "" || m.From != sb.Node || m.To == "" || m.Deadline.IsZero():
			return fmt.Errorf("%w: a migration needs an ID, its source (the sandbox's node %s), a target and a deadline", ErrInvalid, sb.Node)
		}
		c := *m
		c.Started, c.Deadline = utc(t), utc(c.Deadline)
		c.Ended, c.Outcome = time.Time{}, ""
		sb.Migration = &c
	}
	if id := u.CommitMigration; id != "" {
		switch {
		case sb.Migration == nil || sb.Migration.ID != id:
			return fmt.Errorf("%w: migration %s is not in progress", ErrInvalidTransition, id)
		case u.MigrationBy != "" && u.MigrationBy != sb.Migration.To:
			return fmt.Errorf("%w: node %s is not migration %s's target", ErrInvalidTransition, u.MigrationBy, id)
		case t.After(sb.Migration.Deadline):
			return fmt.Errorf("%w: migration %s is past its deadline", ErrInvalidTransition, id)
		}
		m := *sb.Migration
		if s := u.MigrationStats; s != nil {
			m.Downtime, m.Bytes, m.DiskBytes = s.Downtime, s.Bytes, s.DiskBytes
		}
		sb.Node = m.To
		// A new run of the sandbox (on the target): reports of the source's are stale,
		// and what it said of its VM (process, paths, network) is the target's to say.
		sb.Resumes++
		sb.Runtime = nil
		sb.endMigration(m, t, MigrationMoved)
		sb.addEvent(Event{Time: t, Status: sb.Status, Reason: fmt.Sprintf("migrated from node %s to node %s", m.From, m.To)})
	}
	if id := u.EndMigration; id != "" {
		if sb.Migration == nil || sb.Migration.ID != id {
			return fmt.Errorf("%w: migration %s is not in progress", ErrInvalidTransition, id)
		}
		if by := u.MigrationBy; by != "" && by != sb.Migration.To && by != sb.Migration.From {
			return fmt.Errorf("%w: node %s takes no part in migration %s", ErrInvalidTransition, by, id)
		}
		reason := u.Reason
		if reason == "" {
			reason = "failed"
		}
		sb.endMigration(*sb.Migration, t, "failed: "+reason)
	}
	return nil
}

// endMigration records m as ended with outcome and clears the one in progress.
func (sb *Sandbox) endMigration(m Migration, t time.Time, outcome string) {
	m.Ended, m.Outcome = utc(t), boundReason(outcome)
	sb.Migration = nil
	sb.Migrations = append(sb.Migrations, m) // sb is a clone: its slice is its own
	if n := len(sb.Migrations); n > maxMigrations {
		sb.Migrations = sb.Migrations[n-maxMigrations:]
	}
}
