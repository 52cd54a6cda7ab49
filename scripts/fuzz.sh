#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (FUZZTIME each, default 15s): the inputs a
# stranger controls (layers, the guest's bytes, policies, API requests, Host headers).
# `make test` already runs each target's committed corpus (testdata/fuzz and f.Add) as
# plain tests; this explores beyond it. A crash is saved under the package's
# testdata/fuzz/<Target>/ by `go test`: commit it with the fix, and it stays a test.
set -euo pipefail
cd "$(dirname "$0")/.."
time=${FUZZTIME:-15s}
targets=(
	"./internal/node/image/unpack FuzzApplyLayer"
	"./internal/guest/proto FuzzReadFrame"
	"./internal/guest/client FuzzClientGuestBytes"
	"./internal/shared/netpolicy FuzzParsePolicy"
	"./internal/controlplane/server FuzzCreateSandbox"
	"./internal/shared/routes FuzzParseHost"
)
for t in "${targets[@]}"; do
	set -- $t
	echo "== fuzz $2 ($1, $time)"
	# Minimizing a new input runs the target many times; bounded, so that exploring gets the time.
	go test -run '^$' -fuzz "^$2\$" -fuzztime "$time" -fuzzminimizetime 2s "$1"
done
