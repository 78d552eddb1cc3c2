# The README's two commands: `make run` and `make test`.
SHELL := /bin/bash
GO ?= go

.PHONY: run test build vet fuzz bench screenshots

## run: the server on http://localhost:3000 with development sign-in, on a local PostgreSQL
run:
	@url=$$(scripts/db.sh) && DATABASE_URL="$$url" DEV_LOGIN=$${DEV_LOGIN:-true} $(GO) run .

## test: the whole suite (gofmt, vet, unit, HTTP, browser tests, fuzz seeds) with the race detector
test: vet
	@scripts/install.sh pgbouncer
	@url=$$(scripts/db.sh) && DATABASE_URL="$$url" $(GO) test -race -count=1 -timeout 20m ./...

## bench: sends and deliveries against the database's own limits (pgbench: the server's send and the article series' bare send), issue 15's closed and open loops, profiled; writes bench/out/results.md
bench:
	@bash bench/run.sh

## build: the binary ./messenger
build:
	$(GO) build -o messenger .

vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || ls *.go)); \
	  if [ -n "$$unformatted" ]; then echo "gofmt would change: $$unformatted"; exit 1; fi
	$(GO) vet ./...

## screenshots: retake docs/screenshots/ (shown in the README) from the browser tests
screenshots:
	@url=$$(scripts/db.sh) && DATABASE_URL="$$url" SCREENSHOT_DIR=$(CURDIR)/docs/screenshots \
	  $(GO) test -count=1 -run 'TestE2E' .

## fuzz: run each fuzz target for FUZZTIME (default 30s); make test runs their seeds
FUZZTIME ?= 30s
fuzz:
	@url=$$(scripts/db.sh) && for f in $$($(GO) test -list 'Fuzz.*' . | grep ^Fuzz); do \
	  echo "== $$f"; DATABASE_URL="$$url" $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 2s . || exit 1; done
