# Triplane: the two commands are `make run` and `make test`.
GO        ?= go
BIN       := bin/triplane
VERSION   := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X main.version=$(VERSION)
# Race-detector tests on 2 cores; raise locally if you have more.
TESTFLAGS ?= -race -count=1 -timeout 15m
RUNFLAGS  ?=

.PHONY: all build run generate check-generate lint test bench bench-deps clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/triplane

## run: build and start the whole system on this machine (Ctrl-C stops it)
run: build
	./$(BIN) up $(RUNFLAGS)

## generate: regenerate messages/ from proto/
generate:
	$(GO) tool buf format -w
	$(GO) tool buf generate

## check-generate: fail when proto/ is badly formatted or messages/ is stale
check-generate:
	$(GO) tool buf lint
	$(GO) tool buf format --diff --exit-code
	$(GO) tool buf generate
	@if ! git diff --quiet -- messages || [ -n "$$(git ls-files --others --exclude-standard -- messages)" ]; then \
		echo "messages/ is out of date with proto/: run 'make generate' and commit the result"; \
		git status --short -- messages; exit 1; fi

lint:
	@out="$$(gofmt -l .)"; \
		if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

## test: everything CI runs
test: lint check-generate
	$(GO) test $(TESTFLAGS) ./...

## bench: the benchmarks recorded in docs/benchmarks.md
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

## bench-deps: install iperf3, the optional baseline of `triplane bench transfer`
bench-deps:
	scripts/bench-deps

clean:
	rm -rf bin
