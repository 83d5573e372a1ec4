# taskfleet: the two commands a new machine needs are `make dev` and `make test`.
.PHONY: dev stop test test-unit bench lint k8s-validate golden services examples

## Install and start NATS, Postgres and Redis, build, start a fleet and run a demo workload.
dev:
	deploy/dev.sh

## Stop the fleet started by `make dev` (and its own nats-server, if it started one).
stop:
	deploy/dev.sh stop

## Install and start Postgres and Redis (tests start their own nats-server per test).
services:
	deploy/dev-services.sh --no-nats

## Run every test: unit, store, end-to-end (real binaries), golden vectors, k8s manifests.
## The end-to-end tests start target/debug's binaries, which `cargo test` alone does not build.
test: services
	cargo build --workspace --bins --locked
	. .dev/nats-bin && export TASKFLEET_NATS_SERVER_BIN && cargo test --workspace --locked

## Every benchmark (bench/all.sh): taskfleet against BullMQ, Celery and apalis on the same
## workload, latency, scaling, priority, cache and rate-limit costs, the aggregator's ceiling.
## QUICK=1 make bench is a smoke run of the suite.
bench: services
	cargo build --release --locked --workspace --bins
	bench/all.sh

## The five example workloads on the dev fleet (started if it is not running), one table of
## their figures. QUICK=1 make examples: small scale; EXAMPLE=research make examples: one of them.
examples:
	deploy/examples.sh

## Formatting and lints.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## Render and validate the Kubernetes manifests offline.
k8s-validate:
	bash deploy/k8s-validate.sh

## Regenerate the golden wire-format examples in proto/golden (after a deliberate change).
golden:
	cargo run -p taskfleet-proto --example golden
