// Command fireworks-volume-server is a sandbox's volume server (NFSv3, the lock manager,
// a portmapper), run jailed by the node agent, one per sandbox that mounts volumes. It
// is built static (CGO_ENABLED=0) so that its jail needs nothing of the node's
// filesystems (see volume.ServerCommand).
package main

import (
	"os"

	"github.com/fireworks-sandbox/fireworks/internal/node/volume"
)

func main() { os.Exit(volume.Main()) }
