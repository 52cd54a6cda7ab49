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
# corpus lists the target's saved inputs (a crash found is written there).
corpus() { ls "$1/testdata/fuzz/$2" 2>/dev/null | sort || true; }
for t in "${targets[@]}"; do
	set -- $t
	echo "== fuzz $2 ($1, $time)"
	for try in 1 2; do
		before=$(corpus "$1" "$2")
		# Minimizing a new input runs the target many times; bounded, so that exploring gets the time.
		if go test -run '^$' -fuzz "^$2\$" -fuzztime "$time" -fuzzminimizetime 2s "$1" 2>&1 | tee /tmp/fuzz-$$.log; then
			break
		fi
		# Go 1.26's fuzzing coordinator can fail a target with a bare "context deadline
		# exceeded" at the end of -fuzztime, having found nothing (go.dev/issue/75804,
		# fixed in Go 1.27): that, with no input saved, is retried once. A crash always
		# saves its input and fails at once.
		if [ "$try" = 2 ] || [ "$(corpus "$1" "$2")" != "$before" ] || ! grep -q '^    context deadline exceeded$' /tmp/fuzz-$$.log; then
			rm -f /tmp/fuzz-$$.log
			exit 1
		fi
		echo "== fuzz $2: Go's fuzzing deadline race (no input saved), once more"
	done
done
rm -f /tmp/fuzz-$$.log
