#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests under k8s/ (no cluster needed).
#
#   bash deploy/k8s-validate.sh                 the whole check: runs tests/k8s_manifests.rs
#   bash deploy/k8s-validate.sh render OUT_DIR  renders k8s/base and every k8s/overlays/* with
#                                               `kubectl kustomize` into OUT_DIR/<name>.yaml, and
#                                               the optional add-on k8s/monitoring into
#                                               OUT_DIR/addons/monitoring.yaml
#   bash deploy/k8s-validate.sh schema FILE...  validates built-in objects against the
#                                               Kubernetes OpenAPI schemas (kubernetes-validate)
#
# The fleet's invariants (resources, probes, security context, worker drain vs. grace period,
# image tags, references between objects, NATS cluster routes, HPA/KEDA exclusivity, NATS users
# and their Secret, NetworkPolicies, KEDA triggers, prod TLS, ...) are checked in Rust, in
# tests/k8s_manifests.rs, which calls the two subcommands (and `nats-server -t` on every rendered
# nats.conf when a nats-server binary is at hand). This script only
# provides the outside tools: it installs kubectl (apt-get) and kubernetes-validate (pip) when
# they are missing.
#
# Environment:
#   K8S_VALIDATE_VERSIONS  Kubernetes versions the schema step checks against
#                          (default "1.29.0 1.37.0": the oldest and newest supported).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSIONS="${K8S_VALIDATE_VERSIONS:-1.29.0 1.37.0}"

log() { printf 'k8s-validate: %s\n' "$*"; }
die() { printf 'k8s-validate: FAIL: %s\n' "$*" >&2; exit 1; }

ensure_kubectl() {
    if ! command -v kubectl >/dev/null 2>&1; then
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
            log "kubectl not found: installing the kubectl package with apt-get"
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null \
                || die "could not install kubectl with apt-get"
        else
            die "kubectl not found (needed for 'kubectl kustomize'); install the kubectl package"
        fi
    fi
    kubectl kustomize --help >/dev/null 2>&1 \
        || die "this kubectl has no 'kustomize' subcommand (kubectl 1.14 or later is needed)"
}

ensure_kubernetes_validate() {
    command -v python3 >/dev/null 2>&1 || die "python3 not found"
    python3 -c 'import kubernetes_validate' 2>/dev/null && return
    log "python package 'kubernetes-validate' missing: installing it with pip"
    python3 -m pip install --quiet kubernetes-validate >/dev/null 2>&1 \
        || python3 -m pip install --quiet --user kubernetes-validate >/dev/null 2>&1 \
        || die "could not 'pip install kubernetes-validate'"
}

# Renders the kustomization $1 into $2 (a .yaml file); returns 1 (after printing why) on failure.
render_one() {
    local target="$1" file="$2" name
    name="$(basename "$target")"
    if ! kubectl kustomize "$target" >"$file" 2>"$file.err"; then
        printf 'k8s-validate: FAIL: %s: kubectl kustomize failed:\n' "$name" >&2
        sed 's/^/    /' "$file.err" >&2
        rm -f "$file" "$file.err"
        return 1
    fi
    rm -f "$file.err"
}

render() {
    local out="$1" failures=0 target name
    ensure_kubectl
    mkdir -p "$out/addons"
    for target in "$ROOT/k8s/base" "$ROOT"/k8s/overlays/*/; do
        [ -f "$target/kustomization.yaml" ] || continue
        name="$(basename "$target")"
        render_one "$target" "$out/$name.yaml" || failures=$((failures + 1))
    done
    # Add-ons are applied on top of an overlay (they need CRDs an overlay does not).
    for target in "$ROOT/k8s/monitoring"; do
        [ -f "$target/kustomization.yaml" ] || continue
        name="$(basename "$target")"
        render_one "$target" "$out/addons/$name.yaml" || failures=$((failures + 1))
    done
    [ "$failures" -eq 0 ] || die "$failures kustomization(s) failed to render"
}

schema() {
    local failures=0 file version report
    ensure_kubernetes_validate
    report="$(mktemp)"
    for file in "$@"; do
        for version in $VERSIONS; do
            # --strict: unknown fields (typos, fields of another version) fail. The caller leaves
            # out objects of CRD kinds, so any "Couldn't find schema" left means a built-in
            # object with a wrong apiVersion or kind.
            if python3 -m kubernetes_validate --strict --quiet -k "$version" "$file" >"$report" 2>&1 \
                && ! grep -q "Couldn't find schema" "$report"; then
                log "$(basename "$file"): schema OK against Kubernetes $version"
            else
                printf 'k8s-validate: FAIL: %s: schema validation against Kubernetes %s:\n' \
                    "$(basename "$file")" "$version" >&2
                sed 's/^/    /' "$report" >&2
                failures=$((failures + 1))
            fi
        done
    done
    rm -f "$report"
    [ "$failures" -eq 0 ] || die "$failures schema check(s) failed"
}

case "${1:-}" in
    render) [ $# -eq 2 ] || die "usage: $0 render OUT_DIR"; render "$2" ;;
    schema) shift; [ $# -ge 1 ] || die "usage: $0 schema FILE..."; schema "$@" ;;
    "") cd "$ROOT" && exec cargo test -p taskfleet-e2e --test k8s_manifests --locked -- --nocapture ;;
    *) die "unknown subcommand '$1' (render, schema, or none for the whole check)" ;;
esac
