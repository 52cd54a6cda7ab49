// Command fireworks is the Fireworks CLI and, through `fireworks dev`, the single-machine
// platform (API server, state and node agent in one process).
package main

import (
	"context"
	"os"

	"github.com/fireworks-sandbox/fireworks/internal/cli"
)

func main() {
	os.Exit(cli.Main(context.Background(), os.Args[1:]))
}
