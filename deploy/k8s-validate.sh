#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests under k8s/.
#
#   bash deploy/k8s-validate.sh
#
# For the base and each overlay (k8s/overlays/*):
#   1. render it with `kubectl kustomize` (no cluster needed);
#   2. check that every document parses and has apiVersion, kind and
#      metadata.name;
#   3. validate every built-in object against the Kubernetes OpenAPI schemas
#      bundled with `kubernetes-validate` (strict: unknown fields are errors),
#      for the oldest and newest Kubernetes versions we support. Objects of
#      CRD kinds (KEDA's ScaledObject) have no schema there: they get step 2
#      plus the structural checks of step 4;
#   4. assert the fleet's invariants (resources, probes, security context,
#      worker drain vs. grace period, image tags, references between
#      objects, NATS cluster routes, HPA/KEDA exclusivity, ...).
#
# Exits non-zero with a message naming the overlay and object on any failure.
#
# Environment:
#   K8S_VALIDATE_VERSIONS  Kubernetes versions to validate against
#                          (default "1.29.0 1.37.0").
#   K8S_VALIDATE_KEEP      if set, keep the rendered manifests and print where.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
K8S_DIR="$ROOT/k8s"
VERSIONS="${K8S_VALIDATE_VERSIONS:-1.29.0 1.37.0}"

log() { printf 'k8s-validate: %s\n' "$*"; }
die() { printf 'k8s-validate: FAIL: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" = "0" ]; }

# --- tools -------------------------------------------------------------------

if ! command -v kubectl >/dev/null 2>&1; then
    if is_root && command -v apt-get >/dev/null 2>&1; then
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

command -v python3 >/dev/null 2>&1 || die "python3 not found"

pip_install() {
    log "python package '$1' missing: installing it with pip"
    python3 -m pip install --quiet "$1" >/dev/null 2>&1 \
        || python3 -m pip install --quiet --user "$1" >/dev/null 2>&1 \
        || die "could not 'pip install $1'"
}
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml
python3 -c 'import kubernetes_validate' 2>/dev/null || pip_install kubernetes-validate
python3 -c 'import yaml, kubernetes_validate' 2>/dev/null \
    || die "python3 cannot import yaml and kubernetes_validate after installing them"

# --- work area -----------------------------------------------------------------

WORK="$(mktemp -d "${TMPDIR:-/tmp}/k8s-validate.XXXXXX")"
if [ -n "${K8S_VALIDATE_KEEP:-}" ]; then
    trap 'log "rendered manifests kept in $WORK"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi

# The invariant checker: reads one rendered file, writes the built-in objects
# (those with a schema in kubernetes-validate) to a second file.
cat >"$WORK/invariants.py" <<'PY'
"""Invariants of the taskfleet manifests, checked on one rendered overlay.

usage: invariants.py RENDERED.yaml OVERLAY_NAME CORE_OUT.yaml
"""
import re
import sys

import yaml

rendered, overlay, core_out = sys.argv[1:4]
PROD = overlay == "prod"
NAMESPACE = "taskfleet"

# API groups served by CRDs: kubernetes-validate has no schema for them, so
# they only get the structural checks below.
CRD_GROUPS = {"keda.sh"}
# Secrets that the prod overlay expects to be created out of band (it ships
# no password); references to them may not resolve within the render.
EXTERNAL_SECRETS = {"postgres-credentials"} if PROD else set()
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
# Exempt from liveness/readiness probes, with the reason:
# - init containers: Kubernetes rejects probes on them (they run to
#   completion before the pod starts), so only resources are required;
# - Jobs/CronJobs (none today): run-to-completion, nothing to probe.
# Every long-running container of the fleet, third-party ones included
# (NATS, Postgres, Redis, Jaeger), has both probes.
PRIORITIES = ["critical", "high", "normal", "low"]

errors = []


def fail(obj, msg):
    if obj is None:
        errors.append(f"{overlay}: {msg}")
    else:
        errors.append(f"{overlay}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {msg}")


def get(d, *path, default=None):
    for p in path:
        if isinstance(d, dict) and p in d:
            d = d[p]
        elif isinstance(d, list) and isinstance(p, int) and p < len(d):
            d = d[p]
        else:
            return default
    return d


def seconds(value):
    """Parse a humantime-like duration ('30s', '1m', '1m30s', '45') to seconds."""
    value = str(value).strip()
    if re.fullmatch(r"\d+", value):
        return int(value)
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value)
    if not parts or "".join(n + u for n, u in parts) != value.replace(" ", ""):
        raise ValueError(f"cannot parse duration {value!r}")
    for number, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown unit in duration {value!r}")
        total += float(number) * units[unit]
    return total


# --- parse and split -----------------------------------------------------------

try:
    with open(rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
except yaml.YAMLError as e:
    print(f"{overlay}: rendered output is not valid YAML: {e}")
    sys.exit(1)

core, custom = [], []
for d in docs:
    if not isinstance(d, dict):
        fail(None, f"a document is not a mapping: {str(d)[:80]!r}")
        continue
    api, kind, name = d.get("apiVersion"), d.get("kind"), get(d, "metadata", "name")
    if not api or not kind or not name:
        fail(None, f"document without apiVersion/kind/metadata.name: {str(d)[:120]!r}")
        continue
    group = api.split("/")[0] if "/" in api else ""
    (custom if group in CRD_GROUPS else core).append(d)

with open(core_out, "w") as f:
    yaml.safe_dump_all(core, f, sort_keys=False)

objs = core + custom
by_kind = {}
for o in objs:
    by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

# --- every object ----------------------------------------------------------------

for o in objs:
    if o["kind"] == "Namespace":
        if o["metadata"]["name"] != NAMESPACE:
            fail(o, f"unexpected namespace (expected {NAMESPACE})")
    elif get(o, "metadata", "namespace") != NAMESPACE:
        fail(o, f"not in namespace {NAMESPACE!r}")

configmaps = by_kind.get("ConfigMap", {})
secrets = by_kind.get("Secret", {})


def find_configmap(prefix):
    """A generated ConfigMap is named <prefix>-<hash>."""
    for name, cm in configmaps.items():
        if name == prefix or re.fullmatch(re.escape(prefix) + r"-[a-z0-9]{10}", name):
            return cm
    return None


shared = find_configmap("taskfleet-config")
if shared is None:
    fail(None, "ConfigMap taskfleet-config (shared TASKFLEET_* env) is missing")
shared_env = (shared or {}).get("data") or {}

# --- workloads -------------------------------------------------------------------

workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_env(o, c):
    """Env visible to a container (envFrom ConfigMaps, then env), by name."""
    env = {}
    for src in c.get("envFrom") or []:
        ref = get(src, "configMapRef", "name")
        if ref and ref in configmaps:
            env.update(configmaps[ref].get("data") or {})
    for e in c.get("env") or []:
        env[e["name"]] = e.get("value")
    return env


def check_image(o, c):
    image = c.get("image") or ""
    if not image:
        fail(o, f"container {c['name']}: no image")
        return
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        fail(o, f"container {c['name']}: image {image!r} has no tag (means :latest)")
    elif PROD and last.endswith(":latest"):
        fail(o, f"container {c['name']}: image {image!r} uses the 'latest' tag in prod")


for o in workloads:
    spec = get(o, "spec", "template", "spec", default={})
    tmpl_labels = get(o, "spec", "template", "metadata", "labels", default={})
    sel = get(o, "spec", "selector", "matchLabels", default={})
    if not labels_match(sel, tmpl_labels):
        fail(o, f"selector {sel} does not match template labels {tmpl_labels}")

    pod_sc = spec.get("securityContext") or {}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for v in volumes.values():
        cm = get(v, "configMap", "name")
        if cm and cm not in configmaps:
            fail(o, f"volume {v['name']}: ConfigMap {cm!r} not found")
        sec = get(v, "secret", "secretName")
        if sec and sec not in secrets and sec not in EXTERNAL_SECRETS:
            fail(o, f"volume {v['name']}: Secret {sec!r} not found")
    claim_names = {get(t, "metadata", "name") for t in get(o, "spec", "volumeClaimTemplates", default=[])}

    all_containers = [(c, False) for c in spec.get("containers") or []] + \
                     [(c, True) for c in spec.get("initContainers") or []]
    if not spec.get("containers"):
        fail(o, "no containers")
    for c, is_init in all_containers:
        cname = c.get("name")
        check_image(o, c)

        res = c.get("resources") or {}
        for section in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if not get(res, section, r):
                    fail(o, f"container {cname}: resources.{section}.{r} is not set")

        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if not is_init:
            for probe in ("livenessProbe", "readinessProbe"):
                if not c.get(probe):
                    fail(o, f"container {cname}: no {probe}")
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = get(c, probe, "httpGet", "port")
                if isinstance(port, str) and port not in ports:
                    fail(o, f"container {cname}: {probe} uses port {port!r}, not a named container port")

        csc = c.get("securityContext") or {}
        if not (csc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            fail(o, f"container {cname}: runAsNonRoot is not set (pod or container)")
        if csc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            fail(o, f"container {cname}: runs as UID 0")
        if csc.get("readOnlyRootFilesystem") is not True:
            fail(o, f"container {cname}: securityContext.readOnlyRootFilesystem is not true")
        if csc.get("allowPrivilegeEscalation") is not False:
            fail(o, f"container {cname}: securityContext.allowPrivilegeEscalation is not false")

        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes and m["name"] not in claim_names:
                fail(o, f"container {cname}: volumeMount {m['name']!r} has no volume")

        # References to ConfigMaps/Secrets must resolve, and $(VAR) in env
        # values must name a variable defined before it (Kubernetes expands
        # only earlier ones and leaves the text as is otherwise).
        defined = set()
        for src in c.get("envFrom") or []:
            cm = get(src, "configMapRef", "name")
            if cm:
                if cm not in configmaps:
                    fail(o, f"container {cname}: envFrom ConfigMap {cm!r} not found")
                else:
                    defined.update((configmaps[cm].get("data") or {}).keys())
            sec = get(src, "secretRef", "name")
            if sec:
                if sec not in secrets and sec not in EXTERNAL_SECRETS:
                    fail(o, f"container {cname}: envFrom Secret {sec!r} not found")
                elif sec in secrets:
                    s = secrets[sec]
                    defined.update(((s.get("data") or {}) | (s.get("stringData") or {})).keys())
        for e in c.get("env") or []:
            for ref in re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(e.get("value") or "")):
                if ref not in defined:
                    fail(o, f"container {cname}: env {e['name']} uses $({ref}) before {ref} is defined")
            cm = get(e, "valueFrom", "configMapKeyRef", "name")
            if cm and cm not in configmaps:
                fail(o, f"container {cname}: env {e['name']}: ConfigMap {cm!r} not found")
            sec = get(e, "valueFrom", "secretKeyRef")
            if sec:
                s = secrets.get(sec["name"])
                if s is None:
                    if sec["name"] not in EXTERNAL_SECRETS:
                        fail(o, f"container {cname}: env {e['name']}: Secret {sec['name']!r} not found")
                elif sec["key"] not in ((s.get("data") or {}) | (s.get("stringData") or {})):
                    fail(o, f"container {cname}: env {e['name']}: Secret {sec['name']!r} has no key {sec['key']!r}")
            defined.add(e["name"])

deployments = by_kind.get("Deployment", {})
statefulsets = by_kind.get("StatefulSet", {})

for required in ("coordinator", "worker", "aggregator", "redis", "jaeger"):
    if required not in deployments:
        fail(None, f"Deployment {required!r} is missing")
for required in ("nats", "postgres"):
    if required not in statefulsets:
        fail(None, f"StatefulSet {required!r} is missing")

# --- worker: the drain must fit in the grace period --------------------------------

worker = deployments.get("worker")
if worker:
    wspec = get(worker, "spec", "template", "spec", default={})
    grace = wspec.get("terminationGracePeriodSeconds", 30)
    wc = next((c for c in wspec.get("containers", []) if c.get("name") == "worker"), None)
    if wc is None:
        fail(worker, "no container named 'worker'")
    else:
        env = container_env(worker, wc)
        drain_raw = env.get("TASKFLEET_DRAIN_TIMEOUT") or "30s"
        try:
            drain = seconds(drain_raw)
        except ValueError as e:
            fail(worker, f"TASKFLEET_DRAIN_TIMEOUT: {e}")
            drain = 30
        if not grace > 30:
            fail(worker, f"terminationGracePeriodSeconds is {grace}, must be > 30 (the drain default)")
        if not grace > drain:
            fail(worker, f"terminationGracePeriodSeconds ({grace}) must exceed TASKFLEET_DRAIN_TIMEOUT ({drain_raw})")

# --- services select something and target real ports ------------------------------

for svc in by_kind.get("Service", {}).values():
    sel = get(svc, "spec", "selector", default={})
    if not sel:
        fail(svc, "Service without selector")
        continue
    matched = [w for w in workloads
               if labels_match(sel, get(w, "spec", "template", "metadata", "labels", default={}))]
    if not matched:
        fail(svc, f"selector {sel} matches no workload")
        continue
    for p in get(svc, "spec", "ports", default=[]):
        tp = p.get("targetPort", p.get("port"))
        found = False
        for w in matched:
            for c in get(w, "spec", "template", "spec", "containers", default=[]):
                for cp in c.get("ports") or []:
                    if (isinstance(tp, str) and cp.get("name") == tp) or cp.get("containerPort") == tp:
                        found = True
        if not found:
            fail(svc, f"port {p.get('name')}: targetPort {tp!r} is not a port of the selected pods")

# --- disruption budgets --------------------------------------------------------------

pdbs = by_kind.get("PodDisruptionBudget", {}).values()
for name in ("coordinator", "worker"):
    d = deployments.get(name)
    if not d:
        continue
    labels = get(d, "spec", "template", "metadata", "labels", default={})
    if not any(labels_match(get(p, "spec", "selector", "matchLabels", default={}), labels) for p in pdbs):
        fail(d, "no PodDisruptionBudget selects its pods")
for p in pdbs:
    if get(p, "spec", "minAvailable") is not None:
        # minAvailable equal to the replica count (easy with 1-replica dev)
        # blocks every node drain; maxUnavailable always lets one go.
        fail(p, "use maxUnavailable, not minAvailable")

# --- autoscaling: exactly one owner of the worker's replica count --------------------

def targets(obj, kind_field="kind"):
    ref = get(obj, "spec", "scaleTargetRef", default={})
    return (ref.get(kind_field, "Deployment"), ref.get("name"))

hpas = list(by_kind.get("HorizontalPodAutoscaler", {}).values())
scaled = list(by_kind.get("ScaledObject", {}).values())
owners = {}
for o in hpas + scaled:
    t = targets(o)
    owners.setdefault(t, []).append(o)
    if t[0] == "Deployment" and t[1] not in deployments:
        fail(o, f"scaleTargetRef names Deployment {t[1]!r}, which does not exist")
for t, os_ in owners.items():
    if len(os_) > 1:
        fail(None, f"{t[0]}/{t[1]} is scaled by several autoscalers "
                   f"({', '.join(o['kind'] + '/' + o['metadata']['name'] for o in os_)}): they would fight")
if ("Deployment", "worker") not in owners:
    fail(None, "nothing autoscales Deployment/worker")
if PROD:
    if not any(targets(s) == ("Deployment", "worker") for s in scaled):
        fail(None, "no KEDA ScaledObject for Deployment/worker")
    if any(targets(h) == ("Deployment", "worker") for h in hpas):
        fail(None, "the worker HPA must be removed when the ScaledObject is present")

# KEDA ScaledObjects: no schema, so check what matters structurally.
stream_prefix = shared_env.get("TASKFLEET_STREAM_PREFIX", "TASKFLEET")
queues = ["default"]
if worker and wc is not None:
    queues = [q.strip() for q in (container_env(worker, wc).get("TASKFLEET_WORKER_QUEUES") or "default").split(",") if q.strip()]
for s in scaled:
    if s.get("apiVersion") != "keda.sh/v1alpha1":
        fail(s, f"unexpected apiVersion {s.get('apiVersion')!r} (keda.sh/v1alpha1)")
    triggers = get(s, "spec", "triggers", default=[])
    if not triggers:
        fail(s, "no triggers")
    mn, mx = get(s, "spec", "minReplicaCount", default=0), get(s, "spec", "maxReplicaCount", default=100)
    if not (isinstance(mn, int) and isinstance(mx, int) and 0 <= mn <= mx):
        fail(s, f"bad replica bounds min={mn!r} max={mx!r}")
    consumers = set()
    for t in triggers:
        md = t.get("metadata") or {}
        if t.get("type") == "nats-jetstream":
            for key in ("natsServerMonitoringEndpoint", "account", "stream", "consumer"):
                if not md.get(key):
                    fail(s, f"nats-jetstream trigger without {key}")
            for key in ("lagThreshold", "activationLagThreshold"):
                if key in md and not re.fullmatch(r"\d+", str(md[key])):
                    fail(s, f"{key} must be an integer string, got {md[key]!r}")
            if md.get("stream") != f"{stream_prefix}_DISPATCH":
                fail(s, f"trigger stream {md.get('stream')!r}, expected {stream_prefix}_DISPATCH")
            host = str(md.get("natsServerMonitoringEndpoint", "")).split(":")[0]
            if not host.startswith(f"nats-headless.{NAMESPACE}."):
                fail(s, "natsServerMonitoringEndpoint must be the headless NATS service "
                        "(the scaler reaches consumer leaders as <pod>.<endpoint>)")
            consumers.add(md.get("consumer"))
        elif t.get("type") in ("cpu", "memory"):
            if t.get("metricType") not in ("Utilization", "AverageValue") or not md.get("value"):
                fail(s, f"{t.get('type')} trigger needs metricType and metadata.value")
        else:
            fail(s, f"unexpected trigger type {t.get('type')!r}")
    if targets(s) == ("Deployment", "worker"):
        expected = {f"dispatch-{q}-{p}" for q in queues for p in PRIORITIES}
        if consumers != expected:
            fail(s, f"dispatch consumers {sorted(consumers)} != expected {sorted(expected)}")

# --- NATS: cluster config agrees with the replica count ------------------------------

nats = statefulsets.get("nats")
if nats:
    replicas = get(nats, "spec", "replicas", default=1)
    headless = get(nats, "spec", "serviceName")
    nspec = get(nats, "spec", "template", "spec", default={})
    cm_name = next((get(v, "configMap", "name") for v in nspec.get("volumes") or [] if get(v, "configMap")), None)
    conf_cm = configmaps.get(cm_name) if cm_name else None
    conf = next(iter(((conf_cm or {}).get("data") or {}).values()), None)
    if conf is None:
        fail(nats, "no nats.conf in a mounted ConfigMap")
    else:
        code = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
        if "jetstream" not in code:
            fail(nats, "nats.conf does not enable JetStream")
        if re.search(r"\bsync_interval\b", code):
            fail(nats, "nats.conf sets sync_interval: leave it at the default (see DESIGN.md, Durability)")
        routes = re.findall(r"nats://([a-z0-9-]+)\.([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)", code)
        has_cluster = re.search(r"^\s*cluster\s*[{:]", code, re.M) is not None
        if replicas > 1:
            expected = {(f"nats-{i}", headless, "6222") for i in range(replicas)}
            if not has_cluster or set(routes) != expected:
                fail(nats, f"{replicas} replicas need cluster routes to "
                           f"{sorted(f'{p}.{s}:{port}' for p, s, port in expected)}, found "
                           f"{sorted(f'{p}.{s}:{port}' for p, s, port in routes)}")
        elif has_cluster:
            fail(nats, "single replica with a cluster block: JetStream would wait for peers that never come")
    svc = by_kind.get("Service", {}).get(headless)
    if svc is None or get(svc, "spec", "clusterIP") != "None":
        fail(nats, f"serviceName {headless!r} is not a headless Service")
    elif not get(svc, "spec", "publishNotReadyAddresses"):
        fail(svc, "publishNotReadyAddresses must be true so routes resolve before readiness")
    for c in nspec.get("containers") or []:
        m = re.search(r":(\d+)\.(\d+)(?:\.(\d+))?", c.get("image", ""))
        if m is None:
            fail(nats, f"cannot read the nats-server version from image {c.get('image')!r}")
        else:
            v = tuple(int(x) for x in m.groups(default="999"))
            if v < (2, 10, 23):
                fail(nats, f"image {c['image']!r}: nats-server 2.10.23 or later is required")
    if PROD and replicas != 3:
        fail(nats, f"prod runs R3 streams: 3 NATS replicas, not {replicas}")

# --- prod ships no credentials ----------------------------------------------------------

if PROD:
    for s in secrets.values():
        if s.get("data") or s.get("stringData"):
            fail(s, "prod overlay must not carry secret values (create the Secret out of band)")

# --- report --------------------------------------------------------------------------

if errors:
    print(f"{overlay}: {len(errors)} invariant violation(s):")
    for e in errors:
        print(f"  - {e}")
    sys.exit(1)
print(f"{overlay}: invariants OK ({len(objs)} objects: {len(workloads)} workloads, "
      f"{len(custom)} custom resource(s) checked structurally)")
PY

# --- render, validate, check -------------------------------------------------------

targets=("base")
for d in "$K8S_DIR"/overlays/*/; do
    [ -f "$d/kustomization.yaml" ] && targets+=("overlays/$(basename "$d")")
done
[ "${#targets[@]}" -ge 3 ] || die "expected k8s/base and at least the dev and prod overlays, found: ${targets[*]}"

failures=0
for t in "${targets[@]}"; do
    name="$(basename "$t")"
    out="$WORK/$name.yaml"
    core="$WORK/$name.core.yaml"
    log "== $t"

    if ! kubectl kustomize "$K8S_DIR/$t" >"$out" 2>"$WORK/$name.kustomize.err"; then
        printf 'k8s-validate: FAIL: %s: kubectl kustomize failed:\n' "$t" >&2
        sed 's/^/    /' "$WORK/$name.kustomize.err" >&2
        failures=$((failures + 1))
        continue
    fi
    log "$t: rendered $(grep -c '^kind:' "$out") objects"

    if ! python3 "$WORK/invariants.py" "$out" "$name" "$core" >"$WORK/$name.inv.out" 2>&1; then
        printf 'k8s-validate: FAIL: ' >&2
        cat "$WORK/$name.inv.out" >&2
        failures=$((failures + 1))
    else
        log "$(cat "$WORK/$name.inv.out")"
    fi
    [ -s "$core" ] || { log "$t: nothing to schema-check (invariant step failed early)"; continue; }

    for v in $VERSIONS; do
        # --strict: unknown fields (typos, fields of another version) fail.
        # Any remaining "Couldn't find schema" warning means a built-in object
        # with a wrong apiVersion/kind (CRD kinds were filtered out above).
        if python3 -m kubernetes_validate --strict --quiet -k "$v" "$core" >"$WORK/$name.kv.out" 2>&1 \
            && ! grep -q "Couldn't find schema" "$WORK/$name.kv.out"; then
            log "$t: schema OK against Kubernetes $v"
        else
            printf 'k8s-validate: FAIL: %s: schema validation against Kubernetes %s:\n' "$t" "$v" >&2
            sed 's/^/    /' "$WORK/$name.kv.out" >&2
            failures=$((failures + 1))
        fi
    done
done

if [ "$failures" -ne 0 ]; then
    die "$failures check(s) failed (see above)"
fi
log "all manifests valid: ${targets[*]}"
