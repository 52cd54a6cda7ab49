GO      ?= go
GOFLAGS ?=
BIN     := bin

.PHONY: all build deps test vet bench fuzz generate generate-crds clean demo-image image

all: build

build: $(BIN)/fireworks $(BIN)/fireworks-init $(BIN)/fireworks-volume-server

# The guest init must be static: it runs as PID 1 in an initramfs with no libc.
$(BIN)/fireworks-init: FORCE
	CGO_ENABLED=0 $(GO) build $(GOFLAGS) -trimpath -ldflags='-s -w' -o $@ ./cmd/fireworks-init

# The volume server must be static too: its jail holds none of the node's libraries.
$(BIN)/fireworks-volume-server: FORCE
	CGO_ENABLED=0 $(GO) build $(GOFLAGS) -trimpath -ldflags='-s -w' -o $@ ./cmd/fireworks-volume-server

$(BIN)/fireworks: FORCE
	$(GO) build $(GOFLAGS) -trimpath -o $@ ./cmd/fireworks

# The container image the Helm chart runs (docker-archive tar; no Docker daemon).
image: build
	$(GO) run ./cmd/fireworks-image --bin $(BIN) --out $(BIN)/fireworks-image.tar

deps:
	./scripts/install-deps.sh

vet:
	$(GO) vet ./...

# The one test command (README and .ci/run use exactly this).
test:
	$(GO) test -count=1 -p 1 -timeout 40m ./...

fuzz:
	./scripts/fuzz.sh

bench: build
	$(GO) run ./cmd/fireworks-bench -out bench-results.json

generate:
	protoc -I api -I /usr/include \
	  --go_out=internal/shared/api --go_opt=module=github.com/fireworks-sandbox/fireworks/internal/shared/api \
	  --connect-go_out=internal/shared/api --connect-go_opt=module=github.com/fireworks-sandbox/fireworks/internal/shared/api \
	  api/fireworks/v1/fireworks.proto api/fireworks/v1/cluster.proto api/fireworks/v1/ingress.proto
	protoc -I api/envd -I /usr/include \
	  --go_out=internal/guest/envd --go_opt=module=github.com/fireworks-sandbox/fireworks/internal/guest/envd \
	  --connect-go_out=internal/guest/envd --connect-go_opt=module=github.com/fireworks-sandbox/fireworks/internal/guest/envd \
	  api/envd/process/process.proto api/envd/filesystem/filesystem.proto

# agent-sandbox's API as Fireworks serves it: deep copies and the chart's CRDs from the
# Go types in internal/operator/apis.
CONTROLLER_GEN := $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen@v0.20.1
generate-crds:
	GOFLAGS=-mod=mod $(CONTROLLER_GEN) object paths=./internal/operator/apis/...
	GOFLAGS=-mod=mod $(CONTROLLER_GEN) crd:maxDescLen=0 paths=./internal/operator/apis/... output:crd:dir=deploy/helm/fireworks/crds

clean:
	rm -rf $(BIN)

FORCE:
