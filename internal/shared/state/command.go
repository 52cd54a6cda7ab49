package state

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/fireworks-sandbox/fireworks/internal/shared/scheduler"
)

// cmdType is the first byte of every Raft log entry the Store writes; the rest is the
// command body as JSON. The byte is the version: a body that changes incompatibly gets a
// new type rather than a flag inside the old one, so a replayed old log stays readable.
// Additive changes (new optional fields) keep the type, because JSON ignores unknown
// fields and zero-values missing ones.
type cmdType byte

const (
	cmdCreateSandbox cmdType = 1
	cmdUpdateSandbox cmdType = 2
	cmdDeleteSandbox cmdType = 3
	cmdSetMeta       cmdType = 4
	cmdUpsertNode    cmdType = 5
	cmdUpdateNode    cmdType = 6
	cmdDeleteNode    cmdType = 7
	cmdCreateToken   cmdType = 8
	cmdDeleteToken   cmdType = 9
	cmdPlace         cmdType = 10
	// cmdSetPool is ignorable: warm pools are purely additive state, so a server that
	// predates them may skip the command during a rolling upgrade without diverging.
	cmdSetPool = cmdIgnorable | 11
	// cmdJoin spends a join token's use and records the certificate it bought;
	// cmdRemoveNode forgets a node and revokes its certificates. Neither is ignorable:
	// a server that skipped them would admit what the others refuse.
	cmdJoin       cmdType = 12
	cmdRemoveNode cmdType = 13
	// cmdIssueEdgeCert records an ingress certificate and the token that got it, so that
	// revoking the token revokes the certificate. Not ignorable, for the same reason.
	cmdIssueEdgeCert cmdType = 14
	// cmdResume makes a paused sandbox pending again on the node holding its saved state,
	// if that node has room for it now. Not ignorable: it changes a sandbox.
	cmdResume cmdType = 15
	// cmdPutSnapshot and cmdDeleteSnapshot record and forget named filesystem snapshots.
	// Not ignorable: sandboxes start from them.
	cmdPutSnapshot    cmdType = 16
	cmdDeleteSnapshot cmdType = 17
	// cmdPutVolume and cmdDeleteVolume record and forget volumes. Not ignorable:
	// sandboxes mount them, and a delete is refused while one does.
	cmdPutVolume    cmdType = 18
	cmdDeleteVolume cmdType = 19
	cmdShareVolume  cmdType = 20
	// cmdCreateGroup creates a sandbox group's members in one step. Not ignorable: a
	// server that skipped it would have none of them.
	cmdCreateGroup cmdType = 21
	// cmdMoveVolume starts moving an unused volume's data to another node, and
	// cmdVolumeMoved ends that (moved, or not, with a note). Not ignorable: sandboxes
	// mount volumes where they are, and none may while one moves.
	cmdMoveVolume  cmdType = 22
	cmdVolumeMoved cmdType = 23
	// cmdPutTemplate and cmdDeleteTemplate record and forget named templates. Ignorable:
	// purely additive state (a server that skipped them only lacks the templates).
	cmdPutTemplate    = cmdIgnorable | 24
	cmdDeleteTemplate = cmdIgnorable | 25
	// cmdRestored records in the audit log that the state was restored from a state
	// file. Ignorable: it changes nothing else.
	cmdRestored = cmdIgnorable | 26

	// cmdIgnorable marks command types that an FSM which does not know them may skip
	// without diverging in anything it does know (e.g. new, purely additive state). A
	// newer server can then write them during a rolling upgrade. Unknown types without
	// the bit are an error result.
	cmdIgnorable cmdType = 0x80
)

func (t cmdType) String() string {
	switch t {
	case cmdCreateSandbox:
		return "create-sandbox"
	case cmdUpdateSandbox:
		return "update-sandbox"
	case cmdDeleteSandbox:
		return "delete-sandbox"
	case cmdSetMeta:
		return "set-meta"
	case cmdUpsertNode:
		return "upsert-node"
	case cmdUpdateNode:
		return "update-node"
	case cmdDeleteNode:
		return "delete-node"
	case cmdCreateToken:
		return "create-token"
	case cmdDeleteToken:
		return "delete-token"
	case cmdPlace:
		return "place-sandboxes"
	case cmdCreateGroup:
		return "create-group"
	case cmdJoin:
		return "join"
	case cmdRemoveNode:
		return "remove-node"
	case cmdIssueEdgeCert:
		return "issue-edge-cert"
	case cmdSetPool:
		return "set-pool"
	case cmdResume:
		return "resume-sandbox"
	case cmdPutSnapshot:
		return "put-snapshot"
	case cmdDeleteSnapshot:
		return "delete-snapshot"
	case cmdPutVolume:
		return "put-volume"
	case cmdDeleteVolume:
		return "delete-volume"
	case cmdShareVolume:
		return "share-volume"
	case cmdMoveVolume:
		return "move-volume"
	case cmdVolumeMoved:
		return "volume-moved"
	case cmdPutTemplate:
		return "put-template"
	case cmdDeleteTemplate:
		return "delete-template"
	case cmdRestored:
		return "restore-state"
	}
	return fmt.Sprintf("type-%d", byte(t))
}

// maxCommandBytes bounds one log entry: the state is metadata, and an entry this large
// means a bug (or an abusive request) that would bloat every replica's log.
const maxCommandBytes = 1 << 20

type createSandboxCmd struct {
	Sandbox Sandbox `json:"sandbox"`
	// Quota bounds what the owner may hold with this sandbox: checked by the state
	// machine, so concurrent creates cannot pass it together.
	Quota Quota `json:"quota,omitzero"`
	// Place, if set, places the sandbox on that node in the same command (re-checked
	// here with Scheduler, as PlaceSandboxes does; a plan that no longer fits leaves the
	// sandbox pending for the leader's next pass).
	Place     string           `json:"place,omitempty"`
	Scheduler scheduler.Config `json:"scheduler,omitzero"`
}

type updateSandboxCmd struct {
	ID     string `json:"id"`
	Update Update `json:"update"`
}

type resumeSandboxCmd struct {
	ID string `json:"id"`
	// Node, if set, is where to resume (it fetches the saved state from its holder);
	// otherwise the holder if it has room, else whichever node the next pass finds.
	Node      string           `json:"node,omitempty"`
	Scheduler scheduler.Config `json:"scheduler,omitzero"`
	// EndAt, if set, is the sandbox's new end of lifetime (else Spec.Lifetime from now).
	EndAt time.Time `json:"end_at,omitzero"`
	Time  time.Time `json:"time"`
}

type deleteSandboxCmd struct {
	ID string `json:"id"`
}

// setMetaCmd sets or (Delete) removes one key of the small generic KV namespace.
type setMetaCmd struct {
	Key    string `json:"key"`
	Value  []byte `json:"value,omitempty"`
	Delete bool   `json:"delete,omitempty"`
}

// encodeCommand encodes body as a command of type t with its audit stamp.
func encodeCommand(t cmdType, body any, st auditStamp) ([]byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("encode %s command: %w", t, err)
	}
	if b, err = stampAudit(b, st); err != nil {
		return nil, fmt.Errorf("encode %s command: %w", t, err)
	}
	data := make([]byte, 0, 1+len(b))
	data = append(data, byte(t))
	data = append(data, b...)
	if len(data) > maxCommandBytes {
		return nil, fmt.Errorf("%w: %s command is %d bytes, limit %d", ErrInvalid, t, len(data), maxCommandBytes)
	}
	return data, nil
}

func decodeBody(t cmdType, b []byte, v any) error {
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: decode %s command: %v", ErrInvalid, t, err)
	}
	return nil
}
