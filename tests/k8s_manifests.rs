//! Offline validation of the Kubernetes manifests (k8s/base and every overlay). No cluster needed.
//!
//! `deploy/k8s-validate.sh render` renders each kustomization with `kubectl kustomize`; this file
//! parses the result and asserts the fleet's invariants on it (every failure names the overlay and
//! the object); then `deploy/k8s-validate.sh schema` validates the built-in objects against the
//! Kubernetes schemas with `kubernetes-validate` (objects of CRD kinds, KEDA's ScaledObject, have
//! no schema there and get only the structural checks below). `K8S_VALIDATE_KEEP=1` keeps the
//! rendered manifests and prints where.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;
use serde_norway::Value;

/// The namespace every object of the fleet lives in.
const NAMESPACE: &str = "taskfleet";
/// API groups served by CRDs: `kubernetes-validate` has no schema for them.
const CRD_GROUPS: &[&str] = &["keda.sh"];
/// Kinds that run pods.
const WORKLOAD_KINDS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];
/// Dispatch priorities: the worker's ScaledObject watches one consumer per queue and priority.
const PRIORITIES: &[&str] = &["critical", "high", "normal", "low"];
/// The worker's drain timeout when TASKFLEET_DRAIN_TIMEOUT is not set.
const DEFAULT_DRAIN_SECS: f64 = 30.0;
/// The oldest nats-server the fleet runs on (see docs/architecture.md, "Design notes").
const MIN_NATS_SERVER: (u64, u64, u64) = (2, 10, 23);

#[test]
fn k8s_manifests_render_and_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory");
    let work = tempfile::tempdir().expect("temporary directory");
    let out = work.path().to_owned();
    if std::env::var_os("K8S_VALIDATE_KEEP").is_some() {
        println!("rendered manifests kept in {}", work.keep().display());
    }
    run_script(root, &["render".as_ref(), out.as_os_str()]);

    let mut failures = Vec::new();
    let mut core_files = Vec::new();
    let mut rendered = BTreeSet::new();
    for path in yaml_files(&out) {
        let overlay = path.file_stem().and_then(|s| s.to_str()).expect("rendered file name").to_owned();
        let text = std::fs::read_to_string(&path).expect("read rendered manifests");
        match check_overlay(&overlay, &text) {
            Ok(checked) => {
                println!("{overlay}: invariants OK ({})", checked.summary);
                let core = out.join(format!("{overlay}.core.yaml"));
                std::fs::write(&core, checked.core_yaml).expect("write built-in objects");
                core_files.push(core);
            }
            Err(errors) => failures.push(format!(
                "{overlay}: {} invariant violation(s):\n  - {}",
                errors.len(),
                errors.join("\n  - ")
            )),
        }
        rendered.insert(overlay);
    }
    for required in ["base", "dev", "prod"] {
        assert!(rendered.contains(required), "expected k8s/base and the dev and prod overlays, rendered {rendered:?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let mut args = vec!["schema".as_ref()];
    args.extend(core_files.iter().map(|p| p.as_os_str()));
    run_script(root, &args);
}

/// Runs `deploy/k8s-validate.sh` with `args` and panics with its output when it fails.
fn run_script(root: &Path, args: &[&std::ffi::OsStr]) {
    let script = root.join("deploy").join("k8s-validate.sh");
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("could not run bash {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "deploy/k8s-validate.sh {args:?} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    print!("{stdout}");
}

/// The `*.yaml` files of `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list rendered manifests")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// An overlay whose invariants hold.
struct Checked {
    /// The built-in objects (those with a schema in `kubernetes-validate`), as YAML documents.
    core_yaml: String,
    /// What was checked, for the log.
    summary: String,
}

/// Checks the invariants of one rendered overlay (`kubectl kustomize` output).
fn check_overlay(overlay: &str, rendered: &str) -> Result<Checked, Vec<String>> {
    let (texts, docs): (Vec<&str>, Vec<Value>) =
        parse_documents(rendered).map_err(|e| vec![format!("{overlay}: rendered output is not valid YAML: {e}")])?;
    let mut checker = Checker::new(overlay, &docs);
    checker.check_all();
    if !checker.errors.is_empty() {
        return Err(checker.errors);
    }
    // The documents' own text, not a re-serialization: PyYAML reads YAML 1.1, where an unquoted
    // `no` that a YAML 1.2 writer would emit is a boolean.
    let core: Vec<&str> =
        texts.iter().zip(&docs).filter(|(_, doc)| !is_custom_resource(doc)).map(|(text, _)| *text).collect();
    let summary = format!(
        "{} objects: {} workloads, {} custom resource(s) checked structurally",
        docs.len(),
        checker.workloads().count(),
        docs.len() - core.len()
    );
    Ok(Checked { core_yaml: core.iter().map(|text| format!("---\n{text}\n")).collect(), summary })
}

/// Every non-empty document of a multi-document YAML stream, as text and parsed.
fn parse_documents(text: &str) -> Result<(Vec<&str>, Vec<Value>), serde_norway::Error> {
    let mut documents = (Vec::new(), Vec::new());
    let mut start = 0;
    let separators = text.match_indices("---\n").filter(|(i, _)| *i == 0 || text.as_bytes()[i - 1] == b'\n');
    for end in separators.map(|(i, _)| i).chain([text.len()]) {
        let document = &text[start..end];
        start = (end + 4).min(text.len());
        let value: Value = serde_norway::from_str(document)?;
        if !value.is_null() {
            documents.0.push(document);
            documents.1.push(value);
        }
    }
    Ok(documents)
}

fn is_custom_resource(object: &Value) -> bool {
    let api = str_at(object, &["apiVersion"]).unwrap_or_default();
    api.split_once('/').is_some_and(|(group, _)| CRD_GROUPS.contains(&group))
}

/// The value at `path` (mapping keys) under `value`.
fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

/// The sequence at `path`, empty when absent.
fn seq_at<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    at(value, path).and_then(Value::as_sequence).map(Vec::as_slice).unwrap_or_default()
}

/// The string entries of the mapping at `path`, empty when absent.
fn string_map(value: &Value, path: &[&str]) -> BTreeMap<String, String> {
    let Some(mapping) = at(value, path).and_then(Value::as_mapping) else {
        return BTreeMap::new();
    };
    mapping.iter().filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar_string(v)?))).collect()
}

/// A scalar as the text it stands for (`"5"`, `5` and `5.0` as written).
fn scalar_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether a value counts as set: present, not null, not false, zero or empty.
fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Sequence(s)) => !s.is_empty(),
        Some(Value::Mapping(m)) => !m.is_empty(),
        Some(Value::Tagged(_)) => true,
    }
}

/// A non-empty selector whose every label the other set carries.
fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// `Kind/name` of an object.
fn object_id(object: &Value) -> String {
    format!("{}/{}", str_at(object, &["kind"]).unwrap_or("?"), str_at(object, &["metadata", "name"]).unwrap_or("?"))
}

/// Parses a humantime-like duration (`30s`, `1m`, `1m30s`, `45`) to seconds.
fn duration_secs(text: &str) -> Result<f64, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if !compact.is_empty() && compact.chars().all(|c| c.is_ascii_digit()) {
        return compact.parse().map_err(|e| format!("cannot parse duration {text:?}: {e}"));
    }
    let part = Regex::new(r"^(\d+(?:\.\d+)?)([a-z]+)").expect("valid regex");
    let (mut rest, mut total) = (compact.as_str(), 0.0);
    if rest.is_empty() {
        return Err(format!("cannot parse duration {text:?}"));
    }
    while let Some(caps) = part.captures(rest) {
        let unit = match &caps[2] {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("unknown unit in duration {text:?}")),
        };
        total += caps[1].parse::<f64>().map_err(|e| format!("cannot parse duration {text:?}: {e}"))? * unit;
        rest = &rest[caps[0].len()..];
    }
    if rest.is_empty() { Ok(total) } else { Err(format!("cannot parse duration {text:?}")) }
}

/// The variables an env value refers to as `$(NAME)`; `$$(NAME)` is an escape, not a reference.
fn env_references(value: &str) -> Vec<&str> {
    let bytes = value.as_bytes();
    let mut refs = Vec::new();
    let mut i = 0;
    while let Some(offset) = value[i..].find("$(") {
        let start = i + offset;
        i = start + 2;
        if start > 0 && bytes[start - 1] == b'$' {
            continue;
        }
        let Some(len) = value[i..].find(')') else { break };
        let name = &value[i..i + len];
        let mut chars = name.chars();
        if chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            refs.push(name);
        }
    }
    refs
}

/// The invariants of one rendered overlay, collecting every violation.
struct Checker<'a> {
    overlay: &'a str,
    prod: bool,
    objects: Vec<&'a Value>,
    /// Objects by kind, then name.
    by_kind: BTreeMap<&'a str, BTreeMap<&'a str, &'a Value>>,
    /// Secrets the overlay expects to be created out of band (prod ships no password): references
    /// to them may not resolve within the render.
    external_secrets: BTreeSet<&'static str>,
    errors: Vec<String>,
}

impl<'a> Checker<'a> {
    /// Keeps the well-formed documents (mappings with apiVersion, kind and metadata.name) and
    /// records an error for every other one.
    fn new(overlay: &'a str, docs: &'a [Value]) -> Self {
        let prod = overlay == "prod";
        let mut checker = Checker {
            overlay,
            prod,
            objects: Vec::new(),
            by_kind: BTreeMap::new(),
            external_secrets: if prod { BTreeSet::from(["postgres-credentials"]) } else { BTreeSet::new() },
            errors: Vec::new(),
        };
        for doc in docs {
            let text = || serde_json::to_string(doc).unwrap_or_default().chars().take(120).collect::<String>();
            if !doc.is_mapping() {
                checker.fail(None, format!("a document is not a mapping: {}", text()));
                continue;
            }
            let (kind, name) = (str_at(doc, &["kind"]), str_at(doc, &["metadata", "name"]));
            match (str_at(doc, &["apiVersion"]), kind, name) {
                (Some(api), Some(kind), Some(name)) if !api.is_empty() && !kind.is_empty() && !name.is_empty() => {
                    checker.objects.push(doc);
                    checker.by_kind.entry(kind).or_default().insert(name, doc);
                }
                _ => checker.fail(None, format!("document without apiVersion/kind/metadata.name: {}", text())),
            }
        }
        checker
    }

    fn check_all(&mut self) {
        self.check_namespaces();
        if self.find_configmap("taskfleet-config").is_none() {
            self.fail(None, "ConfigMap taskfleet-config (shared TASKFLEET_* env) is missing");
        }
        let workloads: Vec<&Value> = self.workloads().collect();
        for workload in workloads {
            self.check_workload(workload);
        }
        self.check_required_workloads();
        self.check_worker_drain();
        self.check_services();
        self.check_disruption_budgets();
        self.check_autoscalers();
        self.check_scaled_objects();
        self.check_nats();
        self.check_prod_secrets();
    }

    /// Records a violation, naming the overlay and the object.
    fn fail(&mut self, object: Option<&Value>, message: impl AsRef<str>) {
        let message = message.as_ref();
        self.errors.push(match object {
            Some(o) => format!("{}: {}: {message}", self.overlay, object_id(o)),
            None => format!("{}: {message}", self.overlay),
        });
    }

    fn named(&self, kind: &str, name: &str) -> Option<&'a Value> {
        self.by_kind.get(kind).and_then(|objects| objects.get(name)).copied()
    }

    fn all_of(&self, kind: &str) -> Vec<&'a Value> {
        self.by_kind.get(kind).map(|objects| objects.values().copied().collect()).unwrap_or_default()
    }

    fn workloads(&self) -> impl Iterator<Item = &'a Value> + '_ {
        self.objects.iter().copied().filter(|o| str_at(o, &["kind"]).is_some_and(|k| WORKLOAD_KINDS.contains(&k)))
    }

    /// A generated ConfigMap is named `<prefix>-<hash>`.
    fn find_configmap(&self, prefix: &str) -> Option<&'a Value> {
        let hashed = Regex::new(&format!("^{}-[a-z0-9]{{10}}$", regex::escape(prefix))).expect("valid regex");
        let configmaps = self.by_kind.get("ConfigMap")?;
        configmaps.iter().find(|(name, _)| **name == prefix || hashed.is_match(name)).map(|(_, cm)| *cm)
    }

    /// The keys a Secret defines (`data` and `stringData`).
    fn secret_keys(secret: &Value) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = string_map(secret, &["data"]).into_keys().collect();
        keys.extend(string_map(secret, &["stringData"]).into_keys());
        keys
    }

    /// The env a container sees (envFrom ConfigMaps, then env), by name.
    fn container_env(&self, container: &Value) -> BTreeMap<String, Option<String>> {
        let mut env = BTreeMap::new();
        for source in seq_at(container, &["envFrom"]) {
            if let Some(cm) = str_at(source, &["configMapRef", "name"]).and_then(|n| self.named("ConfigMap", n)) {
                env.extend(string_map(cm, &["data"]).into_iter().map(|(k, v)| (k, Some(v))));
            }
        }
        for var in seq_at(container, &["env"]) {
            if let Some(name) = str_at(var, &["name"]) {
                env.insert(name.to_owned(), at(var, &["value"]).and_then(scalar_string));
            }
        }
        env
    }

    fn check_namespaces(&mut self) {
        for object in self.objects.clone() {
            if str_at(object, &["kind"]) == Some("Namespace") {
                if str_at(object, &["metadata", "name"]) != Some(NAMESPACE) {
                    self.fail(Some(object), format!("unexpected namespace (expected {NAMESPACE})"));
                }
            } else if str_at(object, &["metadata", "namespace"]) != Some(NAMESPACE) {
                self.fail(Some(object), format!("not in namespace {NAMESPACE:?}"));
            }
        }
    }

    /// Selector, volumes and every container of one workload.
    fn check_workload(&mut self, workload: &'a Value) {
        let spec = at(workload, &["spec", "template", "spec"]).unwrap_or(&Value::Null);
        let template_labels = string_map(workload, &["spec", "template", "metadata", "labels"]);
        let selector = string_map(workload, &["spec", "selector", "matchLabels"]);
        if !labels_match(&selector, &template_labels) {
            self.fail(
                Some(workload),
                format!("selector {selector:?} does not match template labels {template_labels:?}"),
            );
        }
        let mut mountable = BTreeSet::new();
        for volume in seq_at(spec, &["volumes"]) {
            let name = str_at(volume, &["name"]).unwrap_or_default();
            mountable.insert(name.to_owned());
            if let Some(cm) = str_at(volume, &["configMap", "name"])
                && self.named("ConfigMap", cm).is_none()
            {
                self.fail(Some(workload), format!("volume {name}: ConfigMap {cm:?} not found"));
            }
            if let Some(secret) = str_at(volume, &["secret", "secretName"])
                && self.named("Secret", secret).is_none()
                && !self.external_secrets.contains(secret)
            {
                self.fail(Some(workload), format!("volume {name}: Secret {secret:?} not found"));
            }
        }
        for claim in seq_at(workload, &["spec", "volumeClaimTemplates"]) {
            mountable.extend(str_at(claim, &["metadata", "name"]).map(str::to_owned));
        }
        if !truthy(at(spec, &["containers"])) {
            self.fail(Some(workload), "no containers");
        }
        let pod_security = at(spec, &["securityContext"]).unwrap_or(&Value::Null);
        let containers = seq_at(spec, &["containers"]).iter().map(|c| (c, false));
        let init_containers = seq_at(spec, &["initContainers"]).iter().map(|c| (c, true));
        for (container, is_init) in containers.chain(init_containers) {
            let name = str_at(container, &["name"]).unwrap_or("?");
            self.check_image(workload, container, name);
            self.check_resources(workload, container, name);
            if !is_init {
                // Kubernetes rejects probes on init containers (they run to completion first).
                self.check_probes(workload, container, name);
            }
            self.check_security_context(workload, container, name, pod_security);
            for mount in seq_at(container, &["volumeMounts"]) {
                let volume = str_at(mount, &["name"]).unwrap_or_default();
                if !mountable.contains(volume) {
                    self.fail(Some(workload), format!("container {name}: volumeMount {volume:?} has no volume"));
                }
            }
            self.check_env_references(workload, container, name);
        }
    }

    /// An image has a tag or digest (no tag means `latest`), and prod never uses `latest`.
    fn check_image(&mut self, workload: &Value, container: &Value, name: &str) {
        let image = str_at(container, &["image"]).unwrap_or_default();
        if image.is_empty() {
            self.fail(Some(workload), format!("container {name}: no image"));
            return;
        }
        if image.contains("@sha256:") {
            return;
        }
        let last = image.rsplit('/').next().unwrap_or(image);
        if !last.contains(':') {
            self.fail(Some(workload), format!("container {name}: image {image:?} has no tag (means :latest)"));
        } else if self.prod && last.ends_with(":latest") {
            self.fail(Some(workload), format!("container {name}: image {image:?} uses the 'latest' tag in prod"));
        }
    }

    fn check_resources(&mut self, workload: &Value, container: &Value, name: &str) {
        for section in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                if !truthy(at(container, &["resources", section, resource])) {
                    self.fail(Some(workload), format!("container {name}: resources.{section}.{resource} is not set"));
                }
            }
        }
    }

    /// Liveness and readiness probes exist, and a named probe port is a port of the container.
    fn check_probes(&mut self, workload: &Value, container: &Value, name: &str) {
        let ports: BTreeSet<&str> = seq_at(container, &["ports"]).iter().filter_map(|p| str_at(p, &["name"])).collect();
        for probe in ["livenessProbe", "readinessProbe"] {
            if !truthy(at(container, &[probe])) {
                self.fail(Some(workload), format!("container {name}: no {probe}"));
            }
        }
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            if let Some(port) = str_at(container, &[probe, "httpGet", "port"])
                && !ports.contains(port)
            {
                self.fail(
                    Some(workload),
                    format!("container {name}: {probe} uses port {port:?}, not a named container port"),
                );
            }
        }
    }

    fn check_security_context(&mut self, workload: &Value, container: &Value, name: &str, pod: &Value) {
        let own = at(container, &["securityContext"]).unwrap_or(&Value::Null);
        if !(truthy(own.get("runAsNonRoot")) || truthy(pod.get("runAsNonRoot"))) {
            self.fail(Some(workload), format!("container {name}: runAsNonRoot is not set (pod or container)"));
        }
        if own.get("runAsUser").or_else(|| pod.get("runAsUser")).and_then(Value::as_i64) == Some(0) {
            self.fail(Some(workload), format!("container {name}: runs as UID 0"));
        }
        if own.get("readOnlyRootFilesystem").and_then(Value::as_bool) != Some(true) {
            self.fail(Some(workload), format!("container {name}: securityContext.readOnlyRootFilesystem is not true"));
        }
        if own.get("allowPrivilegeEscalation").and_then(Value::as_bool) != Some(false) {
            self.fail(
                Some(workload),
                format!("container {name}: securityContext.allowPrivilegeEscalation is not false"),
            );
        }
    }

    /// References to ConfigMaps and Secrets resolve, and `$(VAR)` in an env value names a variable
    /// defined before it (Kubernetes expands only earlier ones and leaves the text as is otherwise).
    fn check_env_references(&mut self, workload: &Value, container: &Value, name: &str) {
        let mut defined = BTreeSet::new();
        for source in seq_at(container, &["envFrom"]) {
            if let Some(cm) = str_at(source, &["configMapRef", "name"]) {
                match self.named("ConfigMap", cm) {
                    Some(found) => defined.extend(string_map(found, &["data"]).into_keys()),
                    None => self.fail(Some(workload), format!("container {name}: envFrom ConfigMap {cm:?} not found")),
                }
            }
            if let Some(secret) = str_at(source, &["secretRef", "name"]) {
                match self.named("Secret", secret) {
                    Some(found) => defined.extend(Self::secret_keys(found)),
                    None if self.external_secrets.contains(secret) => {}
                    None => self.fail(Some(workload), format!("container {name}: envFrom Secret {secret:?} not found")),
                }
            }
        }
        for var in seq_at(container, &["env"]) {
            let var_name = str_at(var, &["name"]).unwrap_or_default();
            let value = at(var, &["value"]).and_then(scalar_string).unwrap_or_default();
            for reference in env_references(&value) {
                if !defined.contains(reference) {
                    self.fail(
                        Some(workload),
                        format!("container {name}: env {var_name} uses $({reference}) before {reference} is defined"),
                    );
                }
            }
            if let Some(cm) = str_at(var, &["valueFrom", "configMapKeyRef", "name"])
                && self.named("ConfigMap", cm).is_none()
            {
                self.fail(Some(workload), format!("container {name}: env {var_name}: ConfigMap {cm:?} not found"));
            }
            if let Some(secret_ref) = at(var, &["valueFrom", "secretKeyRef"]) {
                let secret = str_at(secret_ref, &["name"]).unwrap_or_default();
                let key = str_at(secret_ref, &["key"]).unwrap_or_default();
                match self.named("Secret", secret) {
                    None if self.external_secrets.contains(secret) => {}
                    None => self
                        .fail(Some(workload), format!("container {name}: env {var_name}: Secret {secret:?} not found")),
                    Some(found) if !Self::secret_keys(found).contains(key) => self.fail(
                        Some(workload),
                        format!("container {name}: env {var_name}: Secret {secret:?} has no key {key:?}"),
                    ),
                    Some(_) => {}
                }
            }
            defined.insert(var_name.to_owned());
        }
    }

    fn check_required_workloads(&mut self) {
        for name in ["coordinator", "worker", "aggregator", "redis", "jaeger"] {
            if self.named("Deployment", name).is_none() {
                self.fail(None, format!("Deployment {name:?} is missing"));
            }
        }
        for name in ["nats", "postgres"] {
            if self.named("StatefulSet", name).is_none() {
                self.fail(None, format!("StatefulSet {name:?} is missing"));
            }
        }
    }

    /// The worker container of the worker Deployment.
    fn worker_container(&self) -> Option<&'a Value> {
        let worker = self.named("Deployment", "worker")?;
        seq_at(worker, &["spec", "template", "spec", "containers"])
            .iter()
            .find(|c| str_at(c, &["name"]) == Some("worker"))
    }

    /// The worker's drain must fit in its grace period, or Kubernetes kills running tasks.
    fn check_worker_drain(&mut self) {
        let Some(worker) = self.named("Deployment", "worker") else { return };
        let grace = at(worker, &["spec", "template", "spec", "terminationGracePeriodSeconds"])
            .and_then(Value::as_f64)
            .unwrap_or(30.0);
        let Some(container) = self.worker_container() else {
            self.fail(Some(worker), "no container named 'worker'");
            return;
        };
        let drain_text = self
            .container_env(container)
            .remove("TASKFLEET_DRAIN_TIMEOUT")
            .flatten()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "30s".to_owned());
        let drain = duration_secs(&drain_text).unwrap_or_else(|e| {
            self.fail(Some(worker), format!("TASKFLEET_DRAIN_TIMEOUT: {e}"));
            DEFAULT_DRAIN_SECS
        });
        if grace <= DEFAULT_DRAIN_SECS {
            self.fail(
                Some(worker),
                format!("terminationGracePeriodSeconds is {grace}, must be > 30 (the drain default)"),
            );
        }
        if grace <= drain {
            self.fail(
                Some(worker),
                format!("terminationGracePeriodSeconds ({grace}) must exceed TASKFLEET_DRAIN_TIMEOUT ({drain_text})"),
            );
        }
    }

    /// Every Service selects a workload and targets one of its ports.
    fn check_services(&mut self) {
        for service in self.all_of("Service") {
            let selector = string_map(service, &["spec", "selector"]);
            if selector.is_empty() {
                self.fail(Some(service), "Service without selector");
                continue;
            }
            let matched: Vec<&Value> = self
                .workloads()
                .filter(|w| labels_match(&selector, &string_map(w, &["spec", "template", "metadata", "labels"])))
                .collect();
            if matched.is_empty() {
                self.fail(Some(service), format!("selector {selector:?} matches no workload"));
                continue;
            }
            for port in seq_at(service, &["spec", "ports"]) {
                let target = port.get("targetPort").or_else(|| port.get("port")).unwrap_or(&Value::Null);
                let found = matched.iter().any(|w| {
                    seq_at(w, &["spec", "template", "spec", "containers"]).iter().any(|c| {
                        seq_at(c, &["ports"]).iter().any(|p| {
                            (target.is_string() && p.get("name") == Some(target))
                                || p.get("containerPort") == Some(target)
                        })
                    })
                });
                if !found {
                    let port_name = str_at(port, &["name"]).unwrap_or("?");
                    let target = scalar_string(target).unwrap_or_default();
                    self.fail(
                        Some(service),
                        format!("port {port_name}: targetPort {target:?} is not a port of the selected pods"),
                    );
                }
            }
        }
    }

    /// The coordinator and worker pods have a PodDisruptionBudget, and budgets use maxUnavailable.
    fn check_disruption_budgets(&mut self) {
        let budgets = self.all_of("PodDisruptionBudget");
        for name in ["coordinator", "worker"] {
            let Some(deployment) = self.named("Deployment", name) else { continue };
            let labels = string_map(deployment, &["spec", "template", "metadata", "labels"]);
            if !budgets.iter().any(|b| labels_match(&string_map(b, &["spec", "selector", "matchLabels"]), &labels)) {
                self.fail(Some(deployment), "no PodDisruptionBudget selects its pods");
            }
        }
        for budget in budgets {
            if at(budget, &["spec", "minAvailable"]).is_some_and(|v| !v.is_null()) {
                // minAvailable equal to the replica count (easy with 1-replica dev) blocks every
                // node drain; maxUnavailable always lets one go.
                self.fail(Some(budget), "use maxUnavailable, not minAvailable");
            }
        }
    }

    /// `(kind, name)` an autoscaler scales.
    fn scale_target(autoscaler: &Value) -> (String, String) {
        let kind = str_at(autoscaler, &["spec", "scaleTargetRef", "kind"]).unwrap_or("Deployment");
        let name = str_at(autoscaler, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
        (kind.to_owned(), name.to_owned())
    }

    /// Exactly one autoscaler owns the worker's replica count (in prod: KEDA, not the HPA).
    fn check_autoscalers(&mut self) {
        let hpas = self.all_of("HorizontalPodAutoscaler");
        let scaled_objects = self.all_of("ScaledObject");
        let worker = ("Deployment".to_owned(), "worker".to_owned());
        let mut owners: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
        for autoscaler in hpas.iter().chain(&scaled_objects) {
            let target = Self::scale_target(autoscaler);
            if target.0 == "Deployment" && self.named("Deployment", &target.1).is_none() {
                self.fail(
                    Some(autoscaler),
                    format!("scaleTargetRef names Deployment {:?}, which does not exist", target.1),
                );
            }
            owners.entry(target).or_default().push(autoscaler);
        }
        for ((kind, name), autoscalers) in &owners {
            if autoscalers.len() > 1 {
                let ids: Vec<String> = autoscalers.iter().map(|a| object_id(a)).collect();
                self.fail(
                    None,
                    format!("{kind}/{name} is scaled by several autoscalers ({}): they would fight", ids.join(", ")),
                );
            }
        }
        if !owners.contains_key(&worker) {
            self.fail(None, "nothing autoscales Deployment/worker");
        }
        if self.prod {
            if !scaled_objects.iter().any(|s| Self::scale_target(s) == worker) {
                self.fail(None, "no KEDA ScaledObject for Deployment/worker");
            }
            if hpas.iter().any(|h| Self::scale_target(h) == worker) {
                self.fail(None, "the worker HPA must be removed when the ScaledObject is present");
            }
        }
    }

    /// KEDA ScaledObjects have no schema to validate against: check what matters structurally,
    /// and that the worker's triggers watch exactly its dispatch consumers.
    fn check_scaled_objects(&mut self) {
        let shared_env =
            self.find_configmap("taskfleet-config").map(|cm| string_map(cm, &["data"])).unwrap_or_default();
        let stream_prefix = shared_env.get("TASKFLEET_STREAM_PREFIX").map_or("TASKFLEET", String::as_str);
        let queues_text = self
            .worker_container()
            .and_then(|c| self.container_env(c).remove("TASKFLEET_WORKER_QUEUES").flatten())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let queues: Vec<&str> = queues_text.split(',').map(str::trim).filter(|q| !q.is_empty()).collect();
        let digits = Regex::new(r"^\d+$").expect("valid regex");
        for scaled in self.all_of("ScaledObject") {
            if str_at(scaled, &["apiVersion"]) != Some("keda.sh/v1alpha1") {
                let api = str_at(scaled, &["apiVersion"]).unwrap_or_default();
                self.fail(Some(scaled), format!("unexpected apiVersion {api:?} (keda.sh/v1alpha1)"));
            }
            let triggers = seq_at(scaled, &["spec", "triggers"]);
            if triggers.is_empty() {
                self.fail(Some(scaled), "no triggers");
            }
            let min = at(scaled, &["spec", "minReplicaCount"]).cloned().unwrap_or(Value::from(0));
            let max = at(scaled, &["spec", "maxReplicaCount"]).cloned().unwrap_or(Value::from(100));
            if !matches!((min.as_i64(), max.as_i64()), (Some(lo), Some(hi)) if 0 <= lo && lo <= hi) {
                self.fail(Some(scaled), format!("bad replica bounds min={} max={}", json(&min), json(&max)));
            }
            let mut consumers = BTreeSet::new();
            for trigger in triggers {
                let metadata = at(trigger, &["metadata"]).unwrap_or(&Value::Null);
                match str_at(trigger, &["type"]) {
                    Some("nats-jetstream") => {
                        for key in ["natsServerMonitoringEndpoint", "account", "stream", "consumer"] {
                            if !truthy(metadata.get(key)) {
                                self.fail(Some(scaled), format!("nats-jetstream trigger without {key}"));
                            }
                        }
                        for key in ["lagThreshold", "activationLagThreshold"] {
                            if let Some(value) = metadata.get(key)
                                && !scalar_string(value).is_some_and(|v| digits.is_match(&v))
                            {
                                self.fail(
                                    Some(scaled),
                                    format!("{key} must be an integer string, got {}", json(value)),
                                );
                            }
                        }
                        let stream = str_at(metadata, &["stream"]);
                        if stream != Some(&format!("{stream_prefix}_DISPATCH")) {
                            self.fail(
                                Some(scaled),
                                format!("trigger stream {stream:?}, expected {stream_prefix}_DISPATCH"),
                            );
                        }
                        let endpoint = str_at(metadata, &["natsServerMonitoringEndpoint"]).unwrap_or_default();
                        let host = endpoint.split(':').next().unwrap_or_default();
                        if !host.starts_with(&format!("nats-headless.{NAMESPACE}.")) {
                            self.fail(
                                Some(scaled),
                                "natsServerMonitoringEndpoint must be the headless NATS service \
                                 (the scaler reaches consumer leaders as <pod>.<endpoint>)",
                            );
                        }
                        consumers.insert(str_at(metadata, &["consumer"]).unwrap_or_default().to_owned());
                    }
                    Some(kind @ ("cpu" | "memory")) => {
                        let metric_type = str_at(trigger, &["metricType"]);
                        if !matches!(metric_type, Some("Utilization" | "AverageValue"))
                            || !truthy(metadata.get("value"))
                        {
                            self.fail(Some(scaled), format!("{kind} trigger needs metricType and metadata.value"));
                        }
                    }
                    other => self.fail(Some(scaled), format!("unexpected trigger type {other:?}")),
                }
            }
            if Self::scale_target(scaled) == ("Deployment".to_owned(), "worker".to_owned()) {
                let expected: BTreeSet<String> =
                    queues.iter().flat_map(|q| PRIORITIES.iter().map(move |p| format!("dispatch-{q}-{p}"))).collect();
                if consumers != expected {
                    self.fail(Some(scaled), format!("dispatch consumers {consumers:?} != expected {expected:?}"));
                }
            }
        }
    }

    /// The NATS StatefulSet: JetStream on, default sync_interval, cluster routes that match the
    /// replica count, a headless Service that publishes unready pods, a recent enough server.
    fn check_nats(&mut self) {
        let Some(nats) = self.named("StatefulSet", "nats") else { return };
        let replicas = at(nats, &["spec", "replicas"]).and_then(Value::as_u64).unwrap_or(1);
        let headless = str_at(nats, &["spec", "serviceName"]).unwrap_or_default();
        let spec = at(nats, &["spec", "template", "spec"]).unwrap_or(&Value::Null);
        let config = seq_at(spec, &["volumes"])
            .iter()
            .find_map(|v| str_at(v, &["configMap", "name"]))
            .and_then(|name| self.named("ConfigMap", name))
            .and_then(|cm| at(cm, &["data"]).and_then(Value::as_mapping))
            .and_then(|data| data.values().next())
            .and_then(Value::as_str);
        match config {
            None => self.fail(Some(nats), "no nats.conf in a mounted ConfigMap"),
            Some(config) => {
                if let Err(problem) = check_nats_config(config, replicas, headless) {
                    self.fail(Some(nats), problem);
                }
            }
        }
        match self.named("Service", headless) {
            Some(service) if str_at(service, &["spec", "clusterIP"]) == Some("None") => {
                if !truthy(at(service, &["spec", "publishNotReadyAddresses"])) {
                    self.fail(
                        Some(service),
                        "publishNotReadyAddresses must be true so routes resolve before readiness",
                    );
                }
            }
            _ => self.fail(Some(nats), format!("serviceName {headless:?} is not a headless Service")),
        }
        let version = Regex::new(r":(\d+)\.(\d+)(?:\.(\d+))?").expect("valid regex");
        for container in seq_at(spec, &["containers"]) {
            let image = str_at(container, &["image"]).unwrap_or_default();
            let Some(caps) = version.captures(image) else {
                self.fail(Some(nats), format!("cannot read the nats-server version from image {image:?}"));
                continue;
            };
            let part = |i: usize| caps.get(i).map_or(999, |m| m.as_str().parse().unwrap_or(u64::MAX));
            if (part(1), part(2), part(3)) < MIN_NATS_SERVER {
                self.fail(Some(nats), format!("image {image:?}: nats-server 2.10.23 or later is required"));
            }
        }
        if self.prod && replicas != 3 {
            self.fail(Some(nats), format!("prod runs R3 streams: 3 NATS replicas, not {replicas}"));
        }
    }

    fn check_prod_secrets(&mut self) {
        if !self.prod {
            return;
        }
        for secret in self.all_of("Secret") {
            if truthy(at(secret, &["data"])) || truthy(at(secret, &["stringData"])) {
                self.fail(Some(secret), "prod overlay must not carry secret values (create the Secret out of band)");
            }
        }
    }
}

/// Checks a nats.conf against the StatefulSet that runs it: JetStream enabled, `sync_interval`
/// left at its default, and cluster routes to every replica through the headless Service (none
/// for a single replica, which would wait for peers that never come).
fn check_nats_config(config: &str, replicas: u64, headless: &str) -> Result<(), String> {
    let code: String =
        config.lines().map(|line| line.split('#').next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    if !code.contains("jetstream") {
        return Err("nats.conf does not enable JetStream".to_owned());
    }
    if Regex::new(r"\bsync_interval\b").expect("valid regex").is_match(&code) {
        return Err(
            "nats.conf sets sync_interval: leave it at the default (see docs/architecture.md, \"Design notes\")"
                .to_owned(),
        );
    }
    let route = Regex::new(r"nats://([a-z0-9-]+)\.([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)").expect("valid regex");
    let routes: BTreeSet<String> =
        route.captures_iter(&code).map(|c| format!("{}.{}:{}", &c[1], &c[2], &c[3])).collect();
    let has_cluster = Regex::new(r"(?m)^\s*cluster\s*[{:]").expect("valid regex").is_match(&code);
    if replicas > 1 {
        let expected: BTreeSet<String> = (0..replicas).map(|i| format!("nats-{i}.{headless}:6222")).collect();
        if !has_cluster || routes != expected {
            return Err(format!("{replicas} replicas need cluster routes to {expected:?}, found {routes:?}"));
        }
    } else if has_cluster {
        return Err("single replica with a cluster block: JetStream would wait for peers that never come".to_owned());
    }
    Ok(())
}

/// A value as compact JSON, for messages.
fn json(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod checker_tests {
    use super::*;

    /// A minimal worker Deployment that satisfies every per-container invariant.
    const WORKER: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: worker, namespace: taskfleet}
spec:
  selector: {matchLabels: {app: worker}}
  template:
    metadata: {labels: {app: worker}}
    spec:
      terminationGracePeriodSeconds: 45
      securityContext: {runAsNonRoot: true, runAsUser: 1000}
      containers:
        - name: worker
          image: taskfleet/worker:0.1.0
          env: [{name: TASKFLEET_DRAIN_TIMEOUT, value: 30s}]
          ports: [{name: http, containerPort: 8081}]
          livenessProbe: {httpGet: {path: /healthz, port: http}}
          readinessProbe: {httpGet: {path: /readyz, port: http}}
          resources: {requests: {cpu: 100m, memory: 64Mi}, limits: {cpu: "1", memory: 256Mi}}
          securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false}
"#;

    fn errors_for(manifest: &str) -> Vec<String> {
        let (_, docs) = parse_documents(manifest).expect("test manifest is valid YAML");
        let mut checker = Checker::new("prod", &docs);
        let worker = checker.named("Deployment", "worker").expect("test manifest has the worker");
        checker.check_workload(worker);
        checker.check_worker_drain();
        checker.errors
    }

    #[test]
    fn a_sound_worker_passes_its_own_checks() {
        assert_eq!(errors_for(WORKER), Vec::<String>::new());
    }

    #[test]
    fn a_drain_longer_than_the_grace_period_is_reported() {
        let errors = errors_for(&WORKER.replace("value: 30s", "value: 1m"));
        assert_eq!(
            errors,
            ["prod: Deployment/worker: terminationGracePeriodSeconds (45) must exceed TASKFLEET_DRAIN_TIMEOUT (1m)"]
        );
    }

    #[test]
    fn latest_tag_missing_probe_and_writable_root_are_reported() {
        let broken = WORKER
            .replace("taskfleet/worker:0.1.0", "taskfleet/worker:latest")
            .replace(
                "readinessProbe: {httpGet: {path: /readyz, port: http}}",
                "readinessProbe: {httpGet: {path: /readyz, port: web}}",
            )
            .replace("          livenessProbe: {httpGet: {path: /healthz, port: http}}\n", "")
            .replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false");
        let errors = errors_for(&broken);
        let expected = [
            "image \"taskfleet/worker:latest\" uses the 'latest' tag in prod",
            "no livenessProbe",
            "readinessProbe uses port \"web\", not a named container port",
            "securityContext.readOnlyRootFilesystem is not true",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, expected) in errors.iter().zip(expected) {
            assert_eq!(*error, format!("prod: Deployment/worker: container worker: {expected}"));
        }
    }

    #[test]
    fn nats_routes_must_match_the_replica_count() {
        let config = "jetstream {}\ncluster {\n  routes: [nats://nats-0.nats-headless:6222, nats://nats-1.nats-headless:6222]\n}\n";
        assert_eq!(check_nats_config(config, 2, "nats-headless"), Ok(()));
        let error = check_nats_config(config, 3, "nats-headless").expect_err("a route is missing");
        assert!(error.starts_with("3 replicas need cluster routes"), "{error}");
        assert!(check_nats_config(config, 1, "nats-headless").is_err(), "a lone server must not have a cluster block");
        let synced = "jetstream { sync_interval: always }";
        assert!(check_nats_config(synced, 1, "x").expect_err("sync_interval is set").contains("sync_interval"));
        assert_eq!(check_nats_config("jetstream {}  # sync_interval: always", 1, "x"), Ok(()), "comments are ignored");
    }

    #[test]
    fn durations_and_env_references_parse_like_kubernetes_and_the_worker() {
        assert_eq!(duration_secs("45"), Ok(45.0));
        assert_eq!(duration_secs("1m30s"), Ok(90.0));
        assert_eq!(duration_secs("250ms"), Ok(0.25));
        assert!(duration_secs("30 parsecs").is_err());
        assert_eq!(env_references("postgres://u:$(PASSWORD)@db/$(NAME)"), ["PASSWORD", "NAME"]);
        assert_eq!(env_references("$$(ESCAPED) $(1BAD)"), Vec::<&str>::new());
    }
}
