# keymig — build, test, benchmark, fuzz and demo targets.
GO        ?= go
BIN       ?= bin/keymig
FUZZTIME  ?= 15s
BENCHTIME ?= 1s

.PHONY: all build test vet bench fuzz demo torture clean

all: build

build:
	$(GO) build -o $(BIN) .

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed on:"; gofmt -l .; exit 1; }

# GORACE: a race-detector binary otherwise sleeps a second at every exit.
# go test hides a passing package's output: wrap's tests write the
# Wycheproof counts to a file, shown after the run.
test: vet
	@mkdir -p bin && rm -f bin/wycheproof.txt
	GORACE=atexit_sleep_ms=0 KEYMIG_WYCHEPROOF_SUMMARY=$(CURDIR)/bin/wycheproof.txt $(GO) test -race -count=1 ./...
	@cat bin/wycheproof.txt

# Random SIGKILLs by timer, seeded, across migrate, rotate, synckey and an in-place table rotation
# (KEYMIG_TORTURE_SEED=N replays a seed, KEYMIG_TORTURE_KILLS sets the kills per job).
torture:
	KEYMIG_TORTURE=1 $(GO) test -count=1 -run 'TestTorture' -timeout 60m -v ./internal/crashtest/

bench:
	$(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) ./...

# Each fuzz target runs for FUZZTIME; go test allows one -fuzz target per run.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for t in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$t"; $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

demo: build
	KEYMIG=$(CURDIR)/$(BIN) ./examples/quickstart.sh

clean:
	rm -rf bin
