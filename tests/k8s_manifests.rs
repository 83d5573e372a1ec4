//! Offline validation of the Kubernetes manifests (k8s/base and every overlay). No cluster needed.
//!
//! `deploy/k8s-validate.sh render` renders each kustomization with `kubectl kustomize`; this file
//! parses the result and asserts the fleet's invariants on it (every failure names the overlay and
//! the object); then `deploy/k8s-validate.sh schema` validates the built-in objects against the
//! Kubernetes schemas with `kubernetes-validate` (objects of CRD kinds, KEDA's ScaledObject,
//! cert-manager's Certificate and Issuer, the Prometheus Operator's ServiceMonitor and
//! PrometheusRule, have no schema there and get only the structural checks below).
//! `K8S_VALIDATE_KEEP=1` keeps the rendered manifests and prints where.
//!
//! Beyond the objects themselves: the NATS `authorization.conf` every overlay mounts must be what
//! `taskfleet nats-permissions --password-env-prefix NATS_PASSWORD_` prints for that overlay's
//! prefixes, and, when a `nats-server` binary is at hand (`TASKFLEET_NATS_SERVER_BIN`,
//! `.dev/nats-bin` or `PATH`), every rendered nats.conf must pass `nats-server -t` with the
//! environment its pod gets. The optional add-on `k8s/monitoring` is rendered and checked against
//! the base (its rules and dashboard are checked further by tests/monitoring_rules.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use regex::Regex;
use serde_norway::Value;

/// The namespace every object of the fleet lives in.
const NAMESPACE: &str = "taskfleet";
/// API groups served by CRDs: `kubernetes-validate` has no schema for them.
const CRD_GROUPS: &[&str] = &["keda.sh", "cert-manager.io", "monitoring.coreos.com"];
/// Kinds that run pods.
const WORKLOAD_KINDS: &[&str] = &["Deployment", "StatefulSet", "DaemonSet"];
/// Dispatch priorities: the worker's ScaledObject watches one consumer per queue and priority.
const PRIORITIES: &[&str] = &["critical", "high", "normal", "low"];
/// The worker's drain timeout when TASKFLEET_DRAIN_TIMEOUT is not set.
const DEFAULT_DRAIN_SECS: f64 = 30.0;
/// The oldest nats-server the fleet runs on (see docs/architecture.md, "Design notes").
const MIN_NATS_SERVER: (u64, u64, u64) = (2, 10, 23);
/// The services, each logging in to NATS as the role of its name.
const SERVICES: &[&str] = &["coordinator", "worker", "aggregator"];
/// Where the services' NATS users come from, and the prefix of its keys (and of the variables
/// `authorization.conf` reads on the NATS pods).
const NATS_USERS_SECRET: &str = "taskfleet-nats-users";
const PASSWORD_ENV_PREFIX: &str = "NATS_PASSWORD_";
/// The coordinator's HTTP API token.
const API_TOKEN_SECRET: &str = "taskfleet-api-token";
/// The keys of a Secret that cert-manager issues for a Certificate.
const ISSUED_KEYS: &[&str] = &["ca.crt", "tls.crt", "tls.key"];
/// What the configuration check puts where a Secret's value would be (long enough for a token).
const PLACEHOLDER_SECRET: &str = "placeholder-secret-value";
/// Pods label with these to reach the NATS client port / the services' HTTP APIs.
const NATS_CLIENT_LABEL: &str = "taskfleet.io/nats-client";
const API_CLIENT_LABEL: &str = "taskfleet.io/api-client";

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
    let mut cli = Cli::new(root);
    let placeholders = out.join("placeholder-file");
    std::fs::write(&placeholders, format!("{PLACEHOLDER_SECRET}\n")).expect("write a placeholder file");
    let nats_server = NatsServer::find(root);
    for path in yaml_files(&out) {
        let overlay = path.file_stem().and_then(|s| s.to_str()).expect("rendered file name").to_owned();
        let text = std::fs::read_to_string(&path).expect("read rendered manifests");
        match check_overlay(&overlay, &text) {
            Ok(checked) => {
                let mut errors = Vec::new();
                if let Some((conf, env)) = &checked.authorization
                    && let Err(e) = cli.check_authorization(env, conf)
                {
                    errors.push(format!("{overlay}: the mounted {e}"));
                }
                for (deployment, env) in &checked.service_envs {
                    // Files exist only in the pod: the loader checks that they are readable.
                    let env: BTreeMap<String, String> = env
                        .iter()
                        .map(|(k, v)| {
                            let file = v.starts_with('/') && !v.contains(' ');
                            (k.clone(), if file { placeholders.display().to_string() } else { v.clone() })
                        })
                        .collect();
                    if let Err(e) = cli.check_config(&env) {
                        errors.push(format!(
                            "{overlay}: Deployment/{deployment}: its environment is not a valid configuration: {e}"
                        ));
                    }
                }
                if !checked.service_envs.is_empty() {
                    println!(
                        "{overlay}: the environments of {} services load as the fleet's configuration",
                        checked.service_envs.len()
                    );
                }
                match (&nats_server, &checked.nats_server) {
                    (Some(server), Some(run)) => match server.check(&out.join(format!("{overlay}.nats")), run) {
                        Ok(note) => println!("{overlay}: {note}"),
                        Err(e) => errors.push(format!("{overlay}: {e}")),
                    },
                    (None, Some(_)) => println!(
                        "{overlay}: NOTICE: no nats-server binary (TASKFLEET_NATS_SERVER_BIN, .dev/nats-bin, PATH): \
                         nats.conf not checked with nats-server -t"
                    ),
                    _ => {}
                }
                if errors.is_empty() {
                    println!("{overlay}: invariants OK ({})", checked.summary);
                } else {
                    failures.push(format!("{overlay}: {} violation(s):\n  - {}", errors.len(), errors.join("\n  - ")));
                }
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
    let base = std::fs::read_to_string(out.join("base.yaml")).expect("read the rendered base");
    for path in yaml_files(&out.join("addons")) {
        let addon = path.file_stem().and_then(|s| s.to_str()).expect("rendered file name").to_owned();
        let text = std::fs::read_to_string(&path).expect("read rendered add-on");
        match check_addon(&addon, &text, &base) {
            Ok(checked) => {
                println!("addon {addon}: invariants OK ({})", checked.summary);
                let core = out.join("addons").join(format!("{addon}.core.yaml"));
                std::fs::write(&core, checked.core_yaml).expect("write built-in objects");
                core_files.push(core);
            }
            Err(errors) => failures.push(format!(
                "addon {addon}: {} invariant violation(s):\n  - {}",
                errors.len(),
                errors.join("\n  - ")
            )),
        }
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
    /// The mounted `authorization.conf` and the prefix variables of the shared configuration it
    /// must have been generated with.
    authorization: Option<(String, BTreeMap<String, String>)>,
    /// What `nats-server -t` needs to check the NATS pods' configuration.
    nats_server: Option<NatsServerRun>,
    /// The `TASKFLEET_*` variables of each service (Secrets' values replaced by a placeholder).
    service_envs: Vec<(String, BTreeMap<String, String>)>,
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
    let (authorization, nats_server) = (checker.authorization.take(), checker.nats_server_run());
    let service_envs =
        SERVICES.iter().filter_map(|name| Some((name.to_string(), checker.service_env(name)?))).collect();
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
    Ok(Checked {
        core_yaml: core.iter().map(|text| format!("---\n{text}\n")).collect(),
        summary,
        authorization,
        nats_server,
        service_envs,
    })
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
    /// Secrets cert-manager creates for the overlay's Certificates (`spec.secretName`).
    issued_secrets: BTreeSet<&'a str>,
    /// The mounted `authorization.conf` and the prefix variables it must be generated with.
    authorization: Option<(String, BTreeMap<String, String>)>,
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
            external_secrets: if prod {
                BTreeSet::from(["postgres-credentials", NATS_USERS_SECRET, API_TOKEN_SECRET])
            } else {
                BTreeSet::new()
            },
            issued_secrets: BTreeSet::new(),
            authorization: None,
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
        checker.issued_secrets =
            checker.all_of("Certificate").iter().filter_map(|c| str_at(c, &["spec", "secretName"])).collect();
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
        self.check_nats_users();
        self.check_network_policies();
        self.check_api_token();
        self.check_certificates();
        self.check_prod_tls();
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

    /// The keys of the Secret `name` as the pods will see it: from the render, or those
    /// cert-manager writes for a Certificate. `Ok(None)`: created out of band, keys unknown.
    fn provided_secret_keys(&self, name: &str) -> Result<Option<BTreeSet<String>>, String> {
        if let Some(secret) = self.named("Secret", name) {
            Ok(Some(Self::secret_keys(secret)))
        } else if self.issued_secrets.contains(name) {
            Ok(Some(ISSUED_KEYS.iter().map(|k| k.to_string()).collect()))
        } else if self.external_secrets.contains(name) {
            Ok(None)
        } else {
            Err(format!("Secret {name:?} not found (neither in the render nor issued by a Certificate)"))
        }
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
            if let Some(secret) = str_at(volume, &["secret", "secretName"]) {
                match self.provided_secret_keys(secret) {
                    Err(e) => self.fail(Some(workload), format!("volume {name}: {e}")),
                    Ok(Some(keys)) => {
                        for item in seq_at(volume, &["secret", "items"]) {
                            let key = str_at(item, &["key"]).unwrap_or_default();
                            if !keys.contains(key) {
                                self.fail(
                                    Some(workload),
                                    format!("volume {name}: Secret {secret:?} has no key {key:?}"),
                                );
                            }
                        }
                    }
                    Ok(None) => {}
                }
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
                let prefix = str_at(source, &["prefix"]).unwrap_or_default();
                match self.provided_secret_keys(secret) {
                    Ok(keys) => defined.extend(keys.unwrap_or_default().into_iter().map(|k| format!("{prefix}{k}"))),
                    Err(e) => self.fail(Some(workload), format!("container {name}: envFrom: {e}")),
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
                match self.provided_secret_keys(secret) {
                    Err(e) => self.fail(Some(workload), format!("container {name}: env {var_name}: {e}")),
                    Ok(Some(keys)) if !keys.contains(key) => self.fail(
                        Some(workload),
                        format!("container {name}: env {var_name}: Secret {secret:?} has no key {key:?}"),
                    ),
                    Ok(_) => {}
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

    /// The queues the fleet serves: those the coordinator accepts (`TASKFLEET_COORDINATOR_QUEUES`),
    /// which the workers must serve exactly; when the coordinator accepts any, the workers' own.
    fn configured_queues(&mut self) -> Vec<String> {
        let list = |text: Option<String>| -> Vec<String> {
            text.unwrap_or_default().split(',').map(str::trim).filter(|q| !q.is_empty()).map(str::to_owned).collect()
        };
        let coordinator = self
            .service_container("coordinator")
            .map(|c| list(self.container_env(c).remove("TASKFLEET_COORDINATOR_QUEUES").flatten()))
            .unwrap_or_default();
        let mut worker = self
            .worker_container()
            .map(|c| list(self.container_env(c).remove("TASKFLEET_WORKER_QUEUES").flatten()))
            .unwrap_or_default();
        if worker.is_empty() {
            worker.push("default".to_owned());
        }
        if coordinator.is_empty() {
            return worker;
        }
        let (c, w): (BTreeSet<&String>, BTreeSet<&String>) = (coordinator.iter().collect(), worker.iter().collect());
        if c != w {
            self.fail(
                None,
                format!(
                    "the coordinator accepts queues {c:?} but the workers serve {w:?}: tasks of a queue no worker \
                     serves never run, a worker queue the coordinator refuses gets no tasks"
                ),
            );
        }
        coordinator
    }

    /// KEDA ScaledObjects have no schema to validate against: check what matters structurally,
    /// that the worker's triggers watch exactly its dispatch consumers (every queue × priority)
    /// through the headless NATS Service's monitoring port, and that a fallback is valid.
    fn check_scaled_objects(&mut self) {
        let shared_env =
            self.find_configmap("taskfleet-config").map(|cm| string_map(cm, &["data"])).unwrap_or_default();
        let stream_prefix = shared_env.get("TASKFLEET_STREAM_PREFIX").map_or("TASKFLEET", String::as_str).to_owned();
        let queues = self.configured_queues();
        let endpoint = self.nats_monitoring_endpoint();
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
            let bounds = match (min.as_i64(), max.as_i64()) {
                (Some(lo), Some(hi)) if 0 <= lo && lo <= hi => Some((lo, hi)),
                _ => {
                    self.fail(Some(scaled), format!("bad replica bounds min={} max={}", json(&min), json(&max)));
                    None
                }
            };
            let fallback = at(scaled, &["spec", "fallback"]).filter(|f| !f.is_null());
            if let Some(fallback) = fallback {
                let threshold = at(fallback, &["failureThreshold"]).and_then(Value::as_i64);
                let replicas = at(fallback, &["replicas"]).and_then(Value::as_i64);
                if threshold.is_none_or(|t| t < 1) {
                    self.fail(Some(scaled), "fallback.failureThreshold must be at least 1");
                }
                match (replicas, bounds) {
                    (Some(r), Some((lo, hi))) if lo <= r && r <= hi => {}
                    _ => self.fail(Some(scaled), "fallback.replicas must lie within minReplicaCount..maxReplicaCount"),
                }
            }
            let mut consumers = BTreeSet::new();
            for trigger in triggers {
                let metadata = at(trigger, &["metadata"]).unwrap_or(&Value::Null);
                let kind = str_at(trigger, &["type"]);
                // KEDA (2.16) refuses a fallback beside cpu/memory triggers, and unless every
                // trigger states metricType AverageValue.
                if fallback.is_some() {
                    if matches!(kind, Some("cpu" | "memory")) {
                        self.fail(
                            Some(scaled),
                            format!("{kind:?} trigger: KEDA allows no fallback with cpu/memory triggers"),
                        );
                    } else if str_at(trigger, &["metricType"]) != Some("AverageValue") {
                        self.fail(Some(scaled), "with a fallback every trigger needs metricType: AverageValue");
                    }
                }
                match kind {
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
                        let found = str_at(metadata, &["natsServerMonitoringEndpoint"]).unwrap_or_default();
                        match &endpoint {
                            Ok(expected) if found == expected => {}
                            Ok(expected) => self.fail(
                                Some(scaled),
                                format!(
                                    "natsServerMonitoringEndpoint {found:?}, expected {expected:?}: the headless NATS \
                                     Service's monitoring port (the scaler reaches consumer leaders as <pod>.<endpoint>)"
                                ),
                            ),
                            Err(e) => self.fail(Some(scaled), format!("natsServerMonitoringEndpoint: {e}")),
                        }
                        if scalar_string(metadata.get("useHttps").unwrap_or(&Value::Null)).as_deref() == Some("true") {
                            self.fail(
                                Some(scaled),
                                "useHttps is true, but nats.conf serves monitoring over plain http",
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
                    self.fail(
                        Some(scaled),
                        format!(
                            "dispatch consumers {consumers:?} != expected {expected:?} (every queue the fleet serves \
                             × every priority)"
                        ),
                    );
                }
                if self.prod && fallback.is_none() {
                    self.fail(Some(scaled), "no fallback: a failing scaler would freeze the worker count");
                }
            }
        }
    }

    /// `<headless service>.<namespace>.svc.cluster.local:<port>`, the port being the headless
    /// Service's port onto the NATS container port that nats.conf's `http:` listens on.
    fn nats_monitoring_endpoint(&self) -> Result<String, String> {
        let nats = self.named("StatefulSet", "nats").ok_or("no StatefulSet nats")?;
        let headless = str_at(nats, &["spec", "serviceName"]).ok_or("the NATS StatefulSet has no serviceName")?;
        let files = self.nats_config_files().ok_or("no nats-config ConfigMap")?;
        let conf = files.get("nats.conf").ok_or("no nats.conf")?;
        let http = conf_blocks(&strip_conf_comments(conf))
            .get("")
            .and_then(|top| top.get("http").cloned())
            .ok_or("nats.conf has no http (monitoring) listener")?;
        let http_port: u64 =
            http.trim_matches('"').rsplit(':').next().and_then(|p| p.parse().ok()).ok_or("bad http")?;
        let container = seq_at(nats, &["spec", "template", "spec", "containers"]).first().ok_or("no container")?;
        let service = self.named("Service", headless).ok_or(format!("no Service {headless:?}"))?;
        let port = seq_at(service, &["spec", "ports"])
            .iter()
            .find(|p| {
                let target = p.get("targetPort").or_else(|| p.get("port")).unwrap_or(&Value::Null);
                seq_at(container, &["ports"]).iter().any(|cp| {
                    cp.get("containerPort").and_then(Value::as_u64) == Some(http_port)
                        && (cp.get("name") == Some(target) || cp.get("containerPort") == Some(target))
                })
            })
            .and_then(|p| p.get("port").and_then(Value::as_u64))
            .ok_or(format!("Service {headless:?} exposes no port onto the monitoring port {http_port}"))?;
        Ok(format!("{headless}.{NAMESPACE}.svc.cluster.local:{port}"))
    }

    /// The files of the ConfigMap the NATS pods mount (nats.conf, authorization.conf).
    fn nats_config_files(&self) -> Option<BTreeMap<String, String>> {
        let nats = self.named("StatefulSet", "nats")?;
        seq_at(nats, &["spec", "template", "spec", "volumes"])
            .iter()
            .find_map(|v| str_at(v, &["configMap", "name"]))
            .and_then(|name| self.named("ConfigMap", name))
            .map(|cm| string_map(cm, &["data"]))
    }

    /// The NATS StatefulSet: JetStream on, default sync_interval, cluster routes that match the
    /// replica count, a headless Service that publishes unready pods, a recent enough server.
    fn check_nats(&mut self) {
        let Some(nats) = self.named("StatefulSet", "nats") else { return };
        let replicas = at(nats, &["spec", "replicas"]).and_then(Value::as_u64).unwrap_or(1);
        let headless = str_at(nats, &["spec", "serviceName"]).unwrap_or_default();
        let spec = at(nats, &["spec", "template", "spec"]).unwrap_or(&Value::Null);
        match self.nats_config_files().and_then(|mut files| files.remove("nats.conf")) {
            None => self.fail(Some(nats), "no nats.conf in a mounted ConfigMap"),
            Some(config) => {
                if let Err(problem) = check_nats_config(&config, replicas, headless) {
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

    /// The container of the Deployment `name` named like it.
    fn service_container(&self, name: &str) -> Option<&'a Value> {
        let deployment = self.named("Deployment", name)?;
        seq_at(deployment, &["spec", "template", "spec", "containers"])
            .iter()
            .find(|c| str_at(c, &["name"]) == Some(name))
    }

    /// Where each variable of a container comes from: a literal, a Secret's key, or elsewhere.
    fn env_sources(&self, container: &Value) -> BTreeMap<String, EnvSource> {
        let mut sources = BTreeMap::new();
        for source in seq_at(container, &["envFrom"]) {
            let prefix = str_at(source, &["prefix"]).unwrap_or_default();
            if let Some(secret) = str_at(source, &["secretRef", "name"]) {
                for key in self.provided_secret_keys(secret).ok().flatten().unwrap_or_default() {
                    sources.insert(format!("{prefix}{key}"), EnvSource::Secret(secret.to_owned(), key));
                }
            }
            if let Some(cm) = str_at(source, &["configMapRef", "name"]).and_then(|n| self.named("ConfigMap", n)) {
                for (key, value) in string_map(cm, &["data"]) {
                    sources.insert(format!("{prefix}{key}"), EnvSource::Literal(value));
                }
            }
        }
        for var in seq_at(container, &["env"]) {
            let Some(name) = str_at(var, &["name"]) else { continue };
            let source = if let Some(value) = at(var, &["value"]).and_then(scalar_string) {
                EnvSource::Literal(value)
            } else if let Some(secret_ref) = at(var, &["valueFrom", "secretKeyRef"]) {
                let secret = str_at(secret_ref, &["name"]).unwrap_or_default().to_owned();
                EnvSource::Secret(secret, str_at(secret_ref, &["key"]).unwrap_or_default().to_owned())
            } else {
                EnvSource::Other
            };
            sources.insert(name.to_owned(), source);
        }
        sources
    }

    /// NATS users: nats.conf includes the mounted authorization.conf, every password it names is a
    /// variable of the NATS pods, and every service logs in as its own role with that role's
    /// password taken from the same Secret key as the NATS pods' variable.
    fn check_nats_users(&mut self) {
        let Some(nats) = self.named("StatefulSet", "nats") else { return };
        let Some(files) = self.nats_config_files() else { return };
        let conf = strip_conf_comments(files.get("nats.conf").map_or("", String::as_str));
        if !Regex::new(r#"(?m)^\s*include\s+"?authorization\.conf"?\s*;?\s*$"#).expect("valid regex").is_match(&conf) {
            self.fail(Some(nats), "nats.conf does not include \"authorization.conf\" (the per-role users)");
        }
        let Some(authorization) = files.get("authorization.conf") else {
            self.fail(Some(nats), "the nats-config ConfigMap has no authorization.conf");
            return;
        };
        let users = conf_users(authorization);
        if users.is_empty() {
            self.fail(Some(nats), "authorization.conf defines no users");
        }
        let nats_env = seq_at(nats, &["spec", "template", "spec", "containers"])
            .first()
            .map(|c| self.env_sources(c))
            .unwrap_or_default();
        let mut password_source = BTreeMap::new();
        for (user, password) in &users {
            match password.strip_prefix('$') {
                None => self.fail(
                    Some(nats),
                    format!(
                        "authorization.conf: user {user:?} has a literal password; passwords come from the environment"
                    ),
                ),
                Some(var) => match nats_env.get(var) {
                    None => self.fail(
                        Some(nats),
                        format!("user {user:?}: the NATS pods have no variable {var} (nats-server would not start)"),
                    ),
                    Some(source) => {
                        if !matches!(source, EnvSource::Secret(..)) {
                            self.fail(Some(nats), format!("{var} (password of {user:?}) must come from a Secret"));
                        }
                        password_source.insert(user.clone(), source.clone());
                    }
                },
            }
        }
        for deployment in self.all_of("Deployment") {
            let name = str_at(deployment, &["metadata", "name"]).unwrap_or_default();
            for container in seq_at(deployment, &["spec", "template", "spec", "containers"]) {
                let env = self.env_sources(container);
                if !env.contains_key("TASKFLEET_NATS_URL") {
                    continue;
                }
                let Some(EnvSource::Literal(user)) = env.get("TASKFLEET_NATS_USER") else {
                    self.fail(Some(deployment), "talks to NATS (TASKFLEET_NATS_URL) without TASKFLEET_NATS_USER");
                    continue;
                };
                if SERVICES.contains(&name) && user != name {
                    self.fail(Some(deployment), format!("logs in to NATS as {user:?}, not as its own role {name:?}"));
                }
                match (password_source.get(user), env.get("TASKFLEET_NATS_PASSWORD")) {
                    (None, _) => {
                        self.fail(Some(deployment), format!("NATS user {user:?} is not in authorization.conf"))
                    }
                    (Some(expected), Some(found @ EnvSource::Secret(..))) if expected == found => {}
                    (Some(expected), found) => self.fail(
                        Some(deployment),
                        format!(
                            "TASKFLEET_NATS_PASSWORD comes from {found:?}, but the NATS pods check user {user:?} \
                             against {expected:?}"
                        ),
                    ),
                }
            }
        }
        let shared = self.find_configmap("taskfleet-config").map(|cm| string_map(cm, &["data"])).unwrap_or_default();
        let prefixes =
            shared.into_iter().filter(|(k, _)| k.starts_with("TASKFLEET_") && k.ends_with("_PREFIX")).collect();
        self.authorization = Some((authorization.clone(), prefixes));
    }

    /// Default-deny ingress, a policy of its own for every pod, no rule open to everyone, the
    /// NATS monitoring port open to KEDA and Prometheus only, Postgres to the holders of the
    /// database credentials only; and, simulating the policies, exactly the expected flows.
    fn check_network_policies(&mut self) {
        let policies = self.all_of("NetworkPolicy");
        let ingress = |p: &Value| {
            let types = seq_at(p, &["spec", "policyTypes"]);
            types.is_empty() || types.iter().any(|t| t.as_str() == Some("Ingress"))
        };
        let deny_all = policies.iter().any(|p| {
            ingress(p)
                && string_map(p, &["spec", "podSelector", "matchLabels"]).is_empty()
                && seq_at(p, &["spec", "podSelector", "matchExpressions"]).is_empty()
                && seq_at(p, &["spec", "ingress"]).is_empty()
        });
        if !deny_all {
            self.fail(None, "no default-deny ingress NetworkPolicy (podSelector {}, no ingress rules)");
        }
        for policy in &policies {
            for rule in seq_at(policy, &["spec", "ingress"]) {
                let from = seq_at(rule, &["from"]);
                if from.is_empty() {
                    self.fail(Some(policy), "an ingress rule without `from` admits every source");
                }
                for peer in from {
                    let (ns, pods) = (at(peer, &["namespaceSelector"]), at(peer, &["podSelector"]));
                    let empty = |s: Option<&Value>| s.is_some_and(selector_is_empty);
                    if at(peer, &["ipBlock"]).is_some() {
                        self.fail(Some(policy), "ipBlock peers are not used for in-cluster traffic");
                    } else if (ns.is_none() || empty(ns)) && (pods.is_none() || empty(pods)) {
                        self.fail(Some(policy), format!("peer {} admits every pod", json(peer)));
                    }
                }
            }
        }
        let workloads: Vec<&Value> = self.workloads().collect();
        let database_users: BTreeSet<String> = workloads
            .iter()
            .filter(|w| {
                seq_at(w, &["spec", "template", "spec", "containers"])
                    .iter()
                    .any(|c| self.env_sources(c).contains_key("TASKFLEET_DATABASE_URL"))
            })
            .filter_map(|w| str_at(w, &["metadata", "name"]).map(str::to_owned))
            .collect();
        for workload in &workloads {
            let labels = string_map(workload, &["spec", "template", "metadata", "labels"]);
            let own = policies.iter().any(|p| {
                ingress(p)
                    && !selector_is_empty(at(p, &["spec", "podSelector"]).unwrap_or(&Value::Null))
                    && selector_matches(at(p, &["spec", "podSelector"]).unwrap_or(&Value::Null), &labels)
            });
            if !own {
                self.fail(Some(workload), "no NetworkPolicy of its own selects its pods");
            }
        }
        let name_of = |w: &Value| str_at(w, &["metadata", "name"]).unwrap_or_default().to_owned();
        for workload in &workloads {
            let labels = string_map(workload, &["spec", "template", "metadata", "labels"]);
            let ports = container_ports(workload);
            let name = name_of(workload);
            let selecting: Vec<&Value> = policies
                .iter()
                .copied()
                .filter(|p| {
                    ingress(p) && selector_matches(at(p, &["spec", "podSelector"]).unwrap_or(&Value::Null), &labels)
                })
                .collect();
            for policy in &selecting {
                for rule in seq_at(policy, &["spec", "ingress"]) {
                    let from = seq_at(rule, &["from"]);
                    if name == "nats" && ports.get("monitor").is_some_and(|p| rule_admits_port(rule, *p, &ports)) {
                        for peer in from {
                            if !(is_peer(peer, "keda", "keda-operator") || is_peer(peer, "monitoring", "prometheus")) {
                                self.fail(
                                    Some(policy),
                                    format!(
                                        "NATS monitoring (8222) admits {}: only KEDA (namespace keda, keda-operator) \
                                         and Prometheus (namespace monitoring) may reach it",
                                        json(peer)
                                    ),
                                );
                            }
                        }
                    }
                    if name == "postgres" {
                        for peer in from {
                            let target = string_map(peer, &["podSelector", "matchLabels"]);
                            let selects = target.get("app.kubernetes.io/name");
                            let ok = at(peer, &["namespaceSelector"]).is_none()
                                && at(peer, &["ipBlock"]).is_none()
                                && selects.is_some_and(|n| database_users.contains(n));
                            if !ok {
                                self.fail(
                                    Some(policy),
                                    format!(
                                        "Postgres admits {}: only the pods holding the database credentials \
                                         ({database_users:?}), by app.kubernetes.io/name in this namespace",
                                        json(peer)
                                    ),
                                );
                            }
                        }
                    }
                }
            }
        }
        // The flows, simulated: every source against every port of every pod.
        let mut sources: Vec<Peer> = workloads
            .iter()
            .map(|w| Peer::new(&name_of(w), NAMESPACE, string_map(w, &["spec", "template", "metadata", "labels"])))
            .collect();
        let label = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        sources.extend([
            Peer::new(
                "nats-client",
                NAMESPACE,
                label(&[(NATS_CLIENT_LABEL, "true"), ("app.kubernetes.io/name", "cli")]),
            ),
            Peer::new("api-client", NAMESPACE, label(&[(API_CLIENT_LABEL, "true"), ("app.kubernetes.io/name", "ui")])),
            Peer::new("intruder", NAMESPACE, label(&[("app.kubernetes.io/name", "intruder")])),
            Peer::new("keda", "keda", label(&[("app.kubernetes.io/name", "keda-operator")])),
            Peer::new("prometheus", "monitoring", label(&[("app.kubernetes.io/name", "prometheus")])),
            Peer::new("keda-lookalike", NAMESPACE, label(&[("app.kubernetes.io/name", "keda-operator")])),
            Peer::new("prometheus-elsewhere", "default", label(&[("app.kubernetes.io/name", "prometheus")])),
            Peer::new("coordinator-elsewhere", "default", label(&[("app.kubernetes.io/name", "coordinator")])),
        ]);
        for workload in &workloads {
            let dest = name_of(workload);
            let labels = string_map(workload, &["spec", "template", "metadata", "labels"]);
            let ports = container_ports(workload);
            for (port_name, port) in &ports {
                for source in &sources {
                    let admitted = policies_admit(&policies, &labels, &ports, *port, source);
                    let expected = expected_flow(&source.name, &dest, port_name, &database_users);
                    if admitted != expected {
                        let verb = if admitted { "admit" } else { "refuse" };
                        self.fail(
                            Some(workload),
                            format!("the NetworkPolicies {verb} {} → {dest}:{port} ({port_name})", source.name),
                        );
                    }
                }
            }
        }
    }

    /// The NetworkPolicies admit API clients to the coordinator, so it needs a token: without one
    /// its task API answers loopback peers only. The token comes from a Secret (as a mounted
    /// file or a variable), never a literal.
    fn check_api_token(&mut self) {
        let (Some(coordinator), Some(container)) =
            (self.named("Deployment", "coordinator"), self.service_container("coordinator"))
        else {
            return;
        };
        let env = self.env_sources(container);
        match (env.get("TASKFLEET_COORDINATOR_API_TOKEN_FILE"), env.get("TASKFLEET_COORDINATOR_API_TOKEN")) {
            (Some(EnvSource::Literal(file)), None) => {
                if let Err(e) = self.mounted_file(coordinator, container, file) {
                    self.fail(Some(coordinator), format!("TASKFLEET_COORDINATOR_API_TOKEN_FILE: {e}"));
                }
            }
            (None, Some(EnvSource::Secret(..))) => {}
            (None, None) => self.fail(
                Some(coordinator),
                "no API token (TASKFLEET_COORDINATOR_API_TOKEN_FILE): its task API would refuse the API clients \
                 the NetworkPolicy admits",
            ),
            _ => self.fail(
                Some(coordinator),
                "set one of TASKFLEET_COORDINATOR_API_TOKEN_FILE (a mounted Secret) and \
                 TASKFLEET_COORDINATOR_API_TOKEN (from a Secret)",
            ),
        }
    }

    /// Certificates name their Secret and an Issuer of the render (or a ClusterIssuer).
    fn check_certificates(&mut self) {
        for certificate in self.all_of("Certificate") {
            if str_at(certificate, &["spec", "secretName"]).is_none_or(str::is_empty) {
                self.fail(Some(certificate), "no spec.secretName");
            }
            let kind = str_at(certificate, &["spec", "issuerRef", "kind"]).unwrap_or("Issuer");
            let issuer = str_at(certificate, &["spec", "issuerRef", "name"]).unwrap_or_default();
            if kind == "Issuer" && self.named("Issuer", issuer).is_none() {
                self.fail(Some(certificate), format!("issuerRef names Issuer {issuer:?}, which is not in the render"));
            }
            if !truthy(at(certificate, &["spec", "dnsNames"])) && !truthy(at(certificate, &["spec", "isCA"])) {
                self.fail(Some(certificate), "a server certificate without dnsNames");
            }
        }
        for issuer in self.all_of("Issuer") {
            if let Some(secret) = str_at(issuer, &["spec", "ca", "secretName"])
                && !self.issued_secrets.contains(secret)
                && !self.external_secrets.contains(secret)
            {
                self.fail(Some(issuer), format!("CA Secret {secret:?} is issued by no Certificate"));
            }
        }
    }

    /// Whether the file `path` exists in `container` of `workload`: under a volumeMount whose
    /// Secret or ConfigMap volume provides that key.
    fn mounted_file(&self, workload: &Value, container: &Value, path: &str) -> Result<(), String> {
        let best = seq_at(container, &["volumeMounts"])
            .iter()
            .filter_map(|m| {
                let mount = str_at(m, &["mountPath"])?.trim_end_matches('/');
                let rel = path.strip_prefix(mount)?.strip_prefix('/')?;
                Some((mount.len(), rel, m))
            })
            .max_by_key(|(len, ..)| *len);
        let Some((_, rel, mount)) = best else { return Err(format!("{path} is under no volumeMount")) };
        let volume_name = str_at(mount, &["name"]).unwrap_or_default();
        let volume = seq_at(workload, &["spec", "template", "spec", "volumes"])
            .iter()
            .find(|v| str_at(v, &["name"]) == Some(volume_name))
            .ok_or(format!("{path}: no volume {volume_name:?}"))?;
        let (keys, items) = if let Some(secret) = at(volume, &["secret"]) {
            let name = str_at(secret, &["secretName"]).unwrap_or_default();
            (self.provided_secret_keys(name)?, seq_at(secret, &["items"]))
        } else if let Some(cm) = at(volume, &["configMap"]) {
            let name = str_at(cm, &["name"]).unwrap_or_default();
            let keys = self.named("ConfigMap", name).map(|c| string_map(c, &["data"]).into_keys().collect());
            (keys, seq_at(cm, &["items"]))
        } else {
            return Err(format!("{path}: volume {volume_name:?} is neither a Secret nor a ConfigMap"));
        };
        if !items.is_empty() {
            return if items.iter().any(|i| str_at(i, &["path"]) == Some(rel)) {
                Ok(())
            } else {
                Err(format!("{path}: volume {volume_name:?} projects no {rel:?}"))
            };
        }
        match keys {
            Some(keys) if !keys.contains(rel) => Err(format!("{path}: volume {volume_name:?} has no key {rel:?}")),
            _ => Ok(()),
        }
    }

    /// Whether the Certificate issuing the Secret mounted at the directory of `path` names `host`.
    fn certificate_covers(&self, workload: &Value, container: &Value, path: &str, host: &str) -> Result<(), String> {
        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
        let mount = seq_at(container, &["volumeMounts"])
            .iter()
            .find(|m| str_at(m, &["mountPath"]).map(|p| p.trim_end_matches('/')) == Some(dir))
            .ok_or(format!("no volumeMount at {dir}"))?;
        let volume_name = str_at(mount, &["name"]).unwrap_or_default();
        let secret = seq_at(workload, &["spec", "template", "spec", "volumes"])
            .iter()
            .find(|v| str_at(v, &["name"]) == Some(volume_name))
            .and_then(|v| str_at(v, &["secret", "secretName"]))
            .ok_or(format!("volume {volume_name:?} is not a Secret"))?;
        let certificate = self
            .all_of("Certificate")
            .into_iter()
            .find(|c| str_at(c, &["spec", "secretName"]) == Some(secret))
            .ok_or(format!("no Certificate issues the Secret {secret:?}"))?;
        let names: Vec<String> = seq_at(certificate, &["spec", "dnsNames"]).iter().filter_map(scalar_string).collect();
        if names.iter().any(|n| dns_name_covers(n, host)) {
            Ok(())
        } else {
            Err(format!("{} does not name {host:?} (dnsNames {names:?})", object_id(certificate)))
        }
    }

    /// Prod talks TLS to NATS, Postgres and Redis: the servers serve it with mounted certificates
    /// that name the hosts the services use, and every service trusts a mounted CA file.
    fn check_prod_tls(&mut self) {
        if !self.prod {
            return;
        }
        let mut problems: Vec<(Option<&'a Value>, String)> = Vec::new();
        let host_of = |url: &str| -> String {
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            let authority = rest.split(['/', '?']).next().unwrap_or_default();
            let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            host_port.split(':').next().unwrap_or_default().to_owned()
        };
        let mut nats_hosts = BTreeSet::new();
        let mut postgres_hosts = BTreeSet::new();
        let mut redis_hosts = BTreeSet::new();
        for name in SERVICES {
            let (Some(deployment), Some(container)) = (self.named("Deployment", name), self.service_container(name))
            else {
                continue;
            };
            let env = self.container_env(container);
            let get = |k: &str| env.get(k).cloned().flatten().unwrap_or_default();
            let nats_url = get("TASKFLEET_NATS_URL");
            if !nats_url.split(',').all(|u| u.trim().starts_with("tls://")) {
                problems.push((Some(deployment), format!("TASKFLEET_NATS_URL {nats_url:?} is not tls://")));
            }
            nats_hosts.extend(nats_url.split(',').map(|u| host_of(u.trim())));
            let ca = get("TASKFLEET_NATS_TLS_CA_FILE");
            if ca.is_empty() {
                problems.push((Some(deployment), "no TASKFLEET_NATS_TLS_CA_FILE".to_owned()));
            } else if let Err(e) = self.mounted_file(deployment, container, &ca) {
                problems.push((Some(deployment), format!("TASKFLEET_NATS_TLS_CA_FILE: {e}")));
            }
            let database = get("TASKFLEET_DATABASE_URL");
            if !database.is_empty() {
                let query: BTreeMap<&str, &str> = database
                    .split_once('?')
                    .map(|(_, q)| q.split('&').filter_map(|kv| kv.split_once('=')).collect())
                    .unwrap_or_default();
                if query.get("sslmode") != Some(&"verify-full") {
                    problems.push((Some(deployment), "TASKFLEET_DATABASE_URL without sslmode=verify-full".to_owned()));
                }
                match query.get("sslrootcert") {
                    None => problems.push((Some(deployment), "TASKFLEET_DATABASE_URL without sslrootcert=".to_owned())),
                    Some(file) => {
                        if let Err(e) = self.mounted_file(deployment, container, file) {
                            problems.push((Some(deployment), format!("sslrootcert: {e}")));
                        }
                    }
                }
                postgres_hosts.insert(host_of(&database));
            }
            if *name == "worker" {
                let redis = get("TASKFLEET_REDIS_URL");
                if !redis.starts_with("rediss://") {
                    problems.push((Some(deployment), format!("TASKFLEET_REDIS_URL {redis:?} is not rediss://")));
                }
                redis_hosts.insert(host_of(&redis));
                match get("TASKFLEET_REDIS_CA_FILE") {
                    ca if ca.is_empty() => problems.push((Some(deployment), "no TASKFLEET_REDIS_CA_FILE".to_owned())),
                    ca => {
                        if let Err(e) = self.mounted_file(deployment, container, &ca) {
                            problems.push((Some(deployment), format!("TASKFLEET_REDIS_CA_FILE: {e}")));
                        }
                    }
                }
            }
        }
        // NATS: tls on clients and on cluster routes, files mounted, names covered.
        if let (Some(nats), Some(files)) = (self.named("StatefulSet", "nats"), self.nats_config_files()) {
            let container = seq_at(nats, &["spec", "template", "spec", "containers"]).first().unwrap_or(&Value::Null);
            let code = strip_conf_comments(files.get("nats.conf").map_or("", String::as_str));
            let blocks = conf_blocks(&code);
            let route = Regex::new(r"nats://([a-z0-9.-]+):\d+").expect("valid regex");
            let mut routes: BTreeSet<String> = route.captures_iter(&code).map(|c| c[1].to_owned()).collect();
            // The name each server gossips to its peers (cluster.advertise, often from the
            // environment), as pod nats-0 would have it.
            if let Some(advertise) = blocks.get("cluster").and_then(|c| c.get("advertise")) {
                let env = self.container_env(container);
                let value = match advertise.strip_prefix('$') {
                    Some(var) => env.get(var).cloned().flatten().unwrap_or_default(),
                    None => advertise.trim_matches('"').to_owned(),
                };
                let value = value.replace("$(POD_NAME)", "nats-0");
                routes.insert(value.rsplit_once(':').map_or(value.as_str(), |(h, _)| h).to_owned());
            }
            for block in ["tls", "cluster.tls"] {
                let Some(entries) = blocks.get(block) else {
                    problems.push((Some(nats), format!("prod nats.conf has no {block} {{}} block")));
                    continue;
                };
                for key in ["cert_file", "key_file", "ca_file"] {
                    let Some(file) = entries.get(key).map(|f| f.trim_matches('"').to_owned()) else {
                        problems.push((Some(nats), format!("nats.conf {block} has no {key}")));
                        continue;
                    };
                    if let Err(e) = self.mounted_file(nats, container, &file) {
                        problems.push((Some(nats), format!("nats.conf {block}.{key}: {e}")));
                    }
                    if key == "cert_file" {
                        let hosts = if block == "tls" { nats_hosts.clone() } else { routes.clone() };
                        for host in hosts {
                            if let Err(e) = self.certificate_covers(nats, container, &file, &host) {
                                problems.push((Some(nats), format!("{block}: {e}")));
                            }
                        }
                    }
                }
            }
            if blocks.get("cluster.tls").and_then(|t| t.get("verify")).map(String::as_str) != Some("true") {
                problems.push((Some(nats), "cluster tls without verify: true (routes must be mutual TLS)".to_owned()));
            }
        }
        // Postgres and Redis serve TLS with mounted certificates naming the services' hosts.
        for (kind, name, flags, hosts) in [
            ("StatefulSet", "postgres", ["ssl_cert_file=", "ssl_key_file="], &postgres_hosts),
            ("Deployment", "redis", ["--tls-cert-file", "--tls-key-file"], &redis_hosts),
        ] {
            let Some(workload) = self.named(kind, name) else { continue };
            let container =
                seq_at(workload, &["spec", "template", "spec", "containers"]).first().unwrap_or(&Value::Null);
            let args: Vec<String> = seq_at(container, &["args"]).iter().filter_map(scalar_string).collect();
            let on = if name == "postgres" {
                args.iter().any(|a| a == "ssl=on")
            } else {
                args.iter().any(|a| a == "--tls-port")
            };
            if !on {
                problems.push((Some(workload), "does not serve TLS (ssl=on / --tls-port)".to_owned()));
            }
            for flag in flags {
                let file = args.iter().position(|a| a.starts_with(flag)).and_then(|i| {
                    if flag.ends_with('=') {
                        args[i].strip_prefix(flag).map(str::to_owned)
                    } else {
                        args.get(i + 1).cloned()
                    }
                });
                let Some(file) = file else {
                    problems.push((Some(workload), format!("no {flag} argument")));
                    continue;
                };
                if let Err(e) = self.mounted_file(workload, container, &file) {
                    problems.push((Some(workload), format!("{flag}: {e}")));
                }
                if flag.contains("cert") {
                    for host in hosts.iter() {
                        if let Err(e) = self.certificate_covers(workload, container, &file, host) {
                            problems.push((Some(workload), e));
                        }
                    }
                }
            }
            if name == "redis" {
                for probe in ["livenessProbe", "readinessProbe"] {
                    let command: Vec<String> =
                        seq_at(container, &[probe, "exec", "command"]).iter().filter_map(scalar_string).collect();
                    if !command.iter().any(|a| a == "--tls") {
                        problems.push((Some(workload), format!("{probe}: redis-cli without --tls")));
                    }
                }
            }
        }
        for (object, problem) in problems {
            self.fail(object, problem);
        }
    }

    /// The `TASKFLEET_*` variables the service `name` starts with, `$(VAR)` expanded, Secrets'
    /// values replaced by a placeholder.
    fn service_env(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let container = self.service_container(name)?;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        let mut ordered: Vec<(String, EnvSource)> = Vec::new();
        for source in seq_at(container, &["envFrom"]) {
            if let Some(cm) = str_at(source, &["configMapRef", "name"]).and_then(|n| self.named("ConfigMap", n)) {
                ordered.extend(string_map(cm, &["data"]).into_iter().map(|(k, v)| (k, EnvSource::Literal(v))));
            }
        }
        let sources = self.env_sources(container);
        for var in seq_at(container, &["env"]) {
            let var = str_at(var, &["name"]).unwrap_or_default();
            ordered.push((var.to_owned(), sources.get(var).cloned().unwrap_or(EnvSource::Other)));
        }
        for (var, source) in ordered {
            let value = match source {
                EnvSource::Literal(value) => {
                    let mut expanded = value.clone();
                    for reference in env_references(&value) {
                        let known = env.get(reference).cloned().unwrap_or_default();
                        expanded = expanded.replace(&format!("$({reference})"), &known);
                    }
                    expanded
                }
                EnvSource::Secret(..) | EnvSource::Other => PLACEHOLDER_SECRET.to_owned(),
            };
            env.insert(var, value);
        }
        Some(env.into_iter().filter(|(k, _)| k.starts_with("TASKFLEET_")).collect())
    }

    /// The NATS container's configuration files and environment, for `nats-server -t`.
    fn nats_server_run(&self) -> Option<NatsServerRun> {
        let nats = self.named("StatefulSet", "nats")?;
        let container = seq_at(nats, &["spec", "template", "spec", "containers"]).first()?;
        let volumes = seq_at(nats, &["spec", "template", "spec", "volumes"]);
        let mut config_dir = None;
        let mut mounts = Vec::new();
        for mount in seq_at(container, &["volumeMounts"]) {
            let path = str_at(mount, &["mountPath"])?.trim_end_matches('/').to_owned();
            let volume = volumes.iter().find(|v| str_at(v, &["name"]) == str_at(mount, &["name"]));
            if volume.is_some_and(|v| at(v, &["configMap"]).is_some()) {
                config_dir = Some(path.clone());
            }
            mounts.push(path);
        }
        let mut env: Vec<(String, String)> = Vec::new();
        let pod = "nats-0".to_owned();
        for var in seq_at(container, &["env"]) {
            let name = str_at(var, &["name"])?.to_owned();
            let value = if let Some(value) = at(var, &["value"]).and_then(scalar_string) {
                let mut expanded = value.clone();
                for reference in env_references(&value) {
                    if let Some((_, v)) = env.iter().find(|(n, _)| n == reference) {
                        expanded = expanded.replace(&format!("$({reference})"), v);
                    }
                }
                expanded
            } else if str_at(var, &["valueFrom", "fieldRef", "fieldPath"]) == Some("metadata.name") {
                pod.clone()
            } else if at(var, &["valueFrom", "resourceFieldRef"]).is_some() {
                "1073741824".to_owned()
            } else if let Some(secret_ref) = at(var, &["valueFrom", "secretKeyRef"]) {
                let key = str_at(secret_ref, &["key"]).unwrap_or_default();
                str_at(secret_ref, &["name"])
                    .and_then(|s| self.named("Secret", s))
                    .and_then(|s| string_map(s, &["stringData"]).remove(key))
                    .unwrap_or_else(|| format!("p-{}", key.to_lowercase().replace('_', "-")))
            } else {
                "x".to_owned()
            };
            env.push((name, value));
        }
        Some(NatsServerRun { files: self.nats_config_files()?, config_dir: config_dir?, mounts, env })
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

/// Where a container's variable comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EnvSource {
    Literal(String),
    /// `(secret, key)`.
    Secret(String, String),
    Other,
}

/// A pod as a NetworkPolicy sees it.
struct Peer {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
}

impl Peer {
    fn new(name: &str, namespace: &str, labels: BTreeMap<String, String>) -> Peer {
        Peer { name: name.to_owned(), namespace: namespace.to_owned(), labels }
    }

    /// The labels of its namespace (only the automatic name label).
    fn namespace_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), self.namespace.clone())])
    }
}

/// Whether a label selector (`matchLabels`, `matchExpressions`; empty or null: everything)
/// selects `labels`.
fn selector_matches(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let wanted = string_map(selector, &["matchLabels"]);
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
        && seq_at(selector, &["matchExpressions"]).iter().all(|e| {
            let key = str_at(e, &["key"]).unwrap_or_default();
            let values: Vec<String> = seq_at(e, &["values"]).iter().filter_map(scalar_string).collect();
            let value = labels.get(key);
            match str_at(e, &["operator"]) {
                Some("In") => value.is_some_and(|v| values.contains(v)),
                Some("NotIn") => !value.is_some_and(|v| values.contains(v)),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                _ => false,
            }
        })
}

fn selector_is_empty(selector: &Value) -> bool {
    string_map(selector, &["matchLabels"]).is_empty() && seq_at(selector, &["matchExpressions"]).is_empty()
}

/// A peer that is exactly the pods `app.kubernetes.io/name=<app>` of the namespace `namespace`.
fn is_peer(peer: &Value, namespace: &str, app: &str) -> bool {
    at(peer, &["ipBlock"]).is_none()
        && seq_at(peer, &["namespaceSelector", "matchExpressions"]).is_empty()
        && seq_at(peer, &["podSelector", "matchExpressions"]).is_empty()
        && string_map(peer, &["namespaceSelector", "matchLabels"])
            == BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), namespace.to_owned())])
        && string_map(peer, &["podSelector", "matchLabels"])
            == BTreeMap::from([("app.kubernetes.io/name".to_owned(), app.to_owned())])
}

/// A workload's container ports by name (the number as name when unnamed).
fn container_ports(workload: &Value) -> BTreeMap<String, u64> {
    seq_at(workload, &["spec", "template", "spec", "containers"])
        .iter()
        .flat_map(|c| seq_at(c, &["ports"]))
        .filter_map(|p| {
            let number = p.get("containerPort").and_then(Value::as_u64)?;
            Some((str_at(p, &["name"]).map_or_else(|| number.to_string(), str::to_owned), number))
        })
        .collect()
}

/// Whether an ingress rule's `ports` (none: all) admit TCP `port` of a pod with `named` ports.
fn rule_admits_port(rule: &Value, port: u64, named: &BTreeMap<String, u64>) -> bool {
    let ports = seq_at(rule, &["ports"]);
    ports.is_empty()
        || ports.iter().any(|p| {
            if str_at(p, &["protocol"]).is_some_and(|proto| proto != "TCP") {
                return false;
            }
            match p.get("port") {
                None | Some(Value::Null) => true,
                Some(Value::String(name)) => named.get(name) == Some(&port),
                Some(number) => {
                    let low = number.as_u64().unwrap_or(0);
                    let high = p.get("endPort").and_then(Value::as_u64).unwrap_or(low);
                    (low..=high).contains(&port)
                }
            }
        })
}

/// Whether one `from` peer admits `source`.
fn peer_admits(peer: &Value, source: &Peer) -> bool {
    let (namespaces, pods) = (at(peer, &["namespaceSelector"]), at(peer, &["podSelector"]));
    match (namespaces, pods) {
        _ if at(peer, &["ipBlock"]).is_some() => false,
        (None, None) => false,
        (None, Some(pods)) => source.namespace == NAMESPACE && selector_matches(pods, &source.labels),
        (Some(namespaces), pods) => {
            selector_matches(namespaces, &source.namespace_labels())
                && pods.is_none_or(|p| selector_matches(p, &source.labels))
        }
    }
}

/// Whether the NetworkPolicies let `source` open TCP `port` on a pod with `labels`: yes when no
/// ingress policy selects the pod, else when a rule of one of those admits both.
fn policies_admit(
    policies: &[&Value],
    labels: &BTreeMap<String, String>,
    named: &BTreeMap<String, u64>,
    port: u64,
    source: &Peer,
) -> bool {
    let selecting: Vec<&&Value> = policies
        .iter()
        .filter(|p| {
            let types = seq_at(p, &["spec", "policyTypes"]);
            (types.is_empty() || types.iter().any(|t| t.as_str() == Some("Ingress")))
                && selector_matches(at(p, &["spec", "podSelector"]).unwrap_or(&Value::Null), labels)
        })
        .collect();
    selecting.is_empty()
        || selecting.iter().any(|p| {
            seq_at(p, &["spec", "ingress"]).iter().any(|rule| {
                let from = seq_at(rule, &["from"]);
                rule_admits_port(rule, port, named) && (from.is_empty() || from.iter().any(|f| peer_admits(f, source)))
            })
        })
}

/// The flows the fleet needs, and no others: `source` (a workload, or one of the outside peers of
/// `check_network_policies`) to the port named `port` of the workload `dest`.
fn expected_flow(source: &str, dest: &str, port: &str, database_users: &BTreeSet<String>) -> bool {
    let service = SERVICES.contains(&source);
    match (dest, port) {
        ("nats", "client") => service || source == "nats-client",
        ("nats", "cluster") => source == "nats",
        ("nats", "monitor") => matches!(source, "keda" | "prometheus"),
        ("postgres", "postgres") => database_users.contains(source),
        ("redis", "redis") => source == "worker",
        ("jaeger", "otlp-grpc" | "otlp-http") => service,
        (dest, "http") if SERVICES.contains(&dest) => {
            source == "prometheus" || (source == "api-client" && dest != "worker")
        }
        _ => false,
    }
}

/// Whether a certificate's DNS name (`*.` wildcards one label) names `host`.
fn dns_name_covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(rest) => host.split_once('.').is_some_and(|(label, tail)| !label.is_empty() && tail == rest),
        None => name == host,
    }
}

/// A nats.conf without its comments (`#` or `//` to the end of the line, outside quotes).
fn strip_conf_comments(conf: &str) -> String {
    conf.lines()
        .map(|line| {
            let mut quoted = false;
            let bytes = line.as_bytes();
            for (i, c) in line.char_indices() {
                match c {
                    '"' => quoted = !quoted,
                    '#' if !quoted => return &line[..i],
                    '/' if !quoted && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
                    _ => {}
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `key: value` entries of every block of a nats.conf (comments stripped), by the block's
/// dotted path (`""` for the top level, `tls`, `cluster.tls`, ...). Multi-line arrays are
/// skipped; one entry per line, as the fleet's files are written.
fn conf_blocks(code: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut blocks: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::from([(String::new(), BTreeMap::new())]);
    let mut path: Vec<String> = Vec::new();
    let mut in_array = false;
    let key_value = Regex::new(r#"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:[:=]\s*|\s+)(.*?)\s*[,;]?$"#).expect("valid regex");
    for line in code.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if in_array {
            in_array = !line.starts_with(']');
            continue;
        }
        if line == "}" {
            path.pop();
            continue;
        }
        if let Some(head) = line.strip_suffix('{') {
            path.push(head.trim().trim_end_matches([':', '=']).trim().to_owned());
            blocks.entry(path.join(".")).or_default();
            continue;
        }
        if let Some(caps) = key_value.captures(line) {
            let value = caps[2].to_owned();
            if value.starts_with('[') && !value.contains(']') {
                in_array = true;
            }
            blocks.entry(path.join(".")).or_default().insert(caps[1].to_owned(), value);
        }
    }
    blocks
}

/// `(user, password)` of every user of an `authorization { users = [...] }` block.
fn conf_users(conf: &str) -> Vec<(String, String)> {
    let user = Regex::new(r#"\buser\s*[:=]\s*"?([^"\s,}]+)"?"#).expect("valid regex");
    let password = Regex::new(r#"\bpassword\s*[:=]\s*("[^"]*"|[^\s,}]+)"#).expect("valid regex");
    let users: Vec<(usize, String)> =
        user.captures_iter(conf).map(|c| (c.get(0).map_or(0, |m| m.start()), c[1].to_owned())).collect();
    let mut out = Vec::new();
    for (i, (start, name)) in users.iter().enumerate() {
        let end = users.get(i + 1).map_or(conf.len(), |(next, _)| *next);
        let password =
            password.captures(&conf[*start..end]).map(|c| c[1].trim_matches('"').to_owned()).unwrap_or_default();
        out.push((name.clone(), password));
    }
    out
}

/// Runs `taskfleet nats-permissions --password-env-prefix NATS_PASSWORD_`, which loads the fleet's
/// configuration from the environment like every service does and prints the authorization
/// block: `target/debug/taskfleet` if it is built, and `cargo run` when that binary's answer is not
/// the expected one (it may be stale).
struct Cli {
    root: PathBuf,
    /// `cargo run`'s answers, by environment.
    cargo: BTreeMap<BTreeMap<String, String>, Result<String, String>>,
}

impl Cli {
    fn new(root: &Path) -> Cli {
        Cli { root: root.to_owned(), cargo: BTreeMap::new() }
    }

    /// The CLI's output with the fleet's variables `env`: the built binary's if `accept` takes it,
    /// else `cargo run`'s.
    fn output(
        &mut self,
        env: &BTreeMap<String, String>,
        accept: impl Fn(&Result<String, String>) -> bool,
    ) -> Result<String, String> {
        let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| self.root.join("target"), PathBuf::from);
        let binary = target.join("debug").join(format!("taskfleet{}", std::env::consts::EXE_SUFFIX));
        if binary.exists() {
            let built = self.run(Command::new(&binary), env);
            if accept(&built) {
                return built;
            }
        }
        if let Some(answer) = self.cargo.get(env) {
            return answer.clone();
        }
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo.args(["run", "-q", "--locked", "-p", "taskfleet-cli", "--"]);
        let answer = self.run(cargo, env);
        self.cargo.insert(env.clone(), answer.clone());
        answer
    }

    /// Whether `conf` is what the CLI prints with the configuration variables `env`.
    fn check_authorization(&mut self, env: &BTreeMap<String, String>, conf: &str) -> Result<(), String> {
        match self.output(env, |out| out.as_deref() == Ok(conf))? {
            out if out == conf => Ok(()),
            out => Err(format!(
                "authorization.conf differs from `taskfleet nats-permissions --password-env-prefix \
                 {PASSWORD_ENV_PREFIX}` with {env:?}; regenerate it:\n    cargo run -q -p taskfleet-cli -- \
                 nats-permissions --password-env-prefix {PASSWORD_ENV_PREFIX} > k8s/base/nats-authorization.conf\n\
                 --- the CLI prints ---\n{out}"
            )),
        }
    }

    /// Whether a service's `TASKFLEET_*` variables load as the fleet's configuration (every name a
    /// field, every value of its shape): a service refuses to start otherwise.
    fn check_config(&mut self, env: &BTreeMap<String, String>) -> Result<(), String> {
        self.output(env, Result::is_ok).map(drop)
    }

    /// `command nats-permissions ...` with only `env` of the fleet's variables; its stdout.
    fn run(&self, mut command: Command, env: &BTreeMap<String, String>) -> Result<String, String> {
        for (var, _) in std::env::vars_os() {
            if var.to_str().is_some_and(|v| v.starts_with("TASKFLEET_") || v.starts_with("OTEL_")) {
                command.env_remove(var);
            }
        }
        let output = command
            .args(["nats-permissions", "--password-env-prefix", PASSWORD_ENV_PREFIX])
            .envs(env)
            .current_dir(&self.root)
            .output()
            .map_err(|e| format!("cannot run taskfleet nats-permissions: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let error = stderr.lines().filter(|l| l.starts_with("error")).collect::<Vec<_>>().join("; ");
            return Err(if error.is_empty() { stderr.into_owned() } else { error });
        }
        String::from_utf8(output.stdout).map_err(|e| format!("taskfleet nats-permissions printed non-UTF-8: {e}"))
    }
}

/// What `nats-server -t` needs to check the NATS pods' configuration.
struct NatsServerRun {
    /// The mounted ConfigMap's files (nats.conf, authorization.conf).
    files: BTreeMap<String, String>,
    /// Where the ConfigMap is mounted.
    config_dir: String,
    /// Every mount path of the container.
    mounts: Vec<String>,
    /// The container's environment, resolved for pod nats-0 (Secrets outside the render get
    /// placeholder values).
    env: Vec<(String, String)>,
}

/// A nats-server binary, to check rendered configurations with `-t`.
struct NatsServer {
    binary: PathBuf,
}

impl NatsServer {
    /// `TASKFLEET_NATS_SERVER_BIN`, the binary named in `.dev/nats-bin` (`make services`), or
    /// `nats-server` on the PATH.
    fn find(root: &Path) -> Option<NatsServer> {
        let from_env = std::env::var_os("TASKFLEET_NATS_SERVER_BIN").map(PathBuf::from);
        let from_dev = std::fs::read_to_string(root.join(".dev").join("nats-bin")).ok().and_then(|text| {
            text.lines().find_map(|l| l.trim().strip_prefix("TASKFLEET_NATS_SERVER_BIN=").map(PathBuf::from))
        });
        let from_path = std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|d| d.join("nats-server")).find(|p| p.is_file()));
        [from_env, from_dev, from_path].into_iter().flatten().find(|p| p.is_file()).map(|binary| NatsServer { binary })
    }

    /// Lays the pod's files out under `dir` (paths rewritten, throwaway certificates where the
    /// configuration names TLS files) and runs `nats-server -t` with the pod's environment.
    fn check(&self, dir: &Path, run: &NatsServerRun) -> Result<String, String> {
        let io = |e: std::io::Error| format!("nats-server check: {e}");
        let root = dir.join("pod");
        let mut mounts = run.mounts.clone();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mount in &mounts {
            std::fs::create_dir_all(root.join(mount.trim_start_matches('/'))).map_err(io)?;
        }
        let config_dir = root.join(run.config_dir.trim_start_matches('/'));
        let alternatives: Vec<String> = mounts.iter().map(|m| regex::escape(&format!("{m}/"))).collect();
        let mount_path = Regex::new(&format!("({})", alternatives.join("|"))).expect("valid regex");
        let prefix = root.display().to_string();
        for (name, text) in &run.files {
            let rewritten = mount_path.replace_all(text, |c: &regex::Captures| format!("{prefix}{}", &c[1]));
            std::fs::write(config_dir.join(name), rewritten.as_ref()).map_err(io)?;
        }
        let conf = std::fs::read_to_string(config_dir.join("nats.conf")).map_err(io)?;
        let tls_file =
            Regex::new(r#"(?m)^\s*(?:cert_file|key_file|ca_file)\s*[:=]\s*"?([^"\s]+)"?"#).expect("valid regex");
        let files: BTreeSet<String> = tls_file.captures_iter(&conf).map(|c| c[1].to_owned()).collect();
        let mut note = String::new();
        if !files.is_empty() {
            let pki = dir.join("pki");
            std::fs::create_dir_all(&pki).map_err(io)?;
            let (cert, key) = (pki.join("tls.crt"), pki.join("tls.key"));
            let made = Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
                .args(["-subj", "/CN=nats", "-keyout"])
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .output();
            if !made.is_ok_and(|o| o.status.success()) {
                return Ok(
                    "NOTICE: openssl unavailable, so the TLS nats.conf was not checked with nats-server -t".into()
                );
            }
            for file in &files {
                let source = if file.ends_with(".key") { &key } else { &cert };
                std::fs::copy(source, file).map_err(|e| format!("nats-server check: {file}: {e}"))?;
            }
            note = format!(" (with throwaway certificates for {} TLS file(s))", files.len());
        }
        let output = Command::new(&self.binary)
            .arg("-t")
            .arg("-c")
            .arg(config_dir.join("nats.conf"))
            .env_clear()
            .envs(run.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if output.status.success() {
            Ok(format!("nats.conf passes `{} -t` with the pod's environment{note}", self.binary.display()))
        } else {
            Err(format!(
                "`nats-server -t` rejects the rendered nats.conf with the pod's environment: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

/// Checks a rendered add-on (k8s/monitoring) against the rendered base it is applied on top of:
/// its namespace, that each ServiceMonitor selects one Service of the base by labels and names
/// ports it has, that the three services are all scraped, that the PrometheusRule has rules and
/// the dashboard ConfigMap holds JSON dashboards.
fn check_addon(addon: &str, rendered: &str, base: &str) -> Result<Checked, Vec<String>> {
    let (texts, docs) =
        parse_documents(rendered).map_err(|e| vec![format!("{addon}: rendered output is not valid YAML: {e}")])?;
    let (_, base_docs) = parse_documents(base).map_err(|e| vec![format!("base: not valid YAML: {e}")])?;
    let mut errors = Vec::new();
    let services: Vec<&Value> = base_docs.iter().filter(|d| str_at(d, &["kind"]) == Some("Service")).collect();
    let mut scraped = BTreeSet::new();
    for doc in &docs {
        let id = object_id(doc);
        if str_at(doc, &["metadata", "namespace"]) != Some(NAMESPACE) {
            errors.push(format!("{addon}: {id}: not in namespace {NAMESPACE:?}"));
        }
        match str_at(doc, &["kind"]) {
            Some("ServiceMonitor") => {
                let selector = at(doc, &["spec", "selector"]).unwrap_or(&Value::Null);
                let matched: Vec<&&Value> = services
                    .iter()
                    .filter(|s| {
                        !selector_is_empty(selector)
                            && selector_matches(selector, &string_map(s, &["metadata", "labels"]))
                    })
                    .collect();
                if matched.len() != 1 {
                    let names: Vec<String> = matched.iter().map(|s| object_id(s)).collect();
                    errors.push(format!(
                        "{addon}: {id}: selects {} Services of the base {names:?}, not one",
                        names.len()
                    ));
                }
                let endpoints = seq_at(doc, &["spec", "endpoints"]);
                if endpoints.is_empty() {
                    errors.push(format!("{addon}: {id}: no endpoints"));
                }
                for service in &matched {
                    let ports: BTreeSet<&str> =
                        seq_at(service, &["spec", "ports"]).iter().filter_map(|p| str_at(p, &["name"])).collect();
                    for endpoint in endpoints {
                        let port = str_at(endpoint, &["port"]).unwrap_or_default();
                        if !ports.contains(port) {
                            errors.push(format!(
                                "{addon}: {id}: port {port:?} is not a named port of {}",
                                object_id(service)
                            ));
                        }
                        if str_at(endpoint, &["path"]).unwrap_or("/metrics") != "/metrics" {
                            errors.push(format!("{addon}: {id}: the services serve /metrics"));
                        }
                    }
                    scraped.extend(str_at(service, &["metadata", "name"]).map(str::to_owned));
                }
            }
            Some("PrometheusRule") => {
                let groups = seq_at(doc, &["spec", "groups"]);
                if groups.is_empty() || groups.iter().any(|g| seq_at(g, &["rules"]).is_empty()) {
                    errors.push(format!("{addon}: {id}: no rules (every group needs some)"));
                }
            }
            Some("ConfigMap") if string_map(doc, &["metadata", "labels"]).contains_key("grafana_dashboard") => {
                for (file, text) in string_map(doc, &["data"]) {
                    match serde_json::from_str::<serde_json::Value>(&text) {
                        Ok(dashboard) if dashboard.get("panels").is_some_and(|p| p.is_array()) => {}
                        _ => {
                            errors.push(format!("{addon}: {id}: {file} is not a Grafana dashboard (JSON with panels)"))
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if addon == "monitoring" {
        for service in SERVICES {
            if !scraped.contains(*service) {
                errors.push(format!("{addon}: no ServiceMonitor scrapes the Service {service:?}"));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let core: Vec<&str> =
        texts.iter().zip(&docs).filter(|(_, doc)| !is_custom_resource(doc)).map(|(text, _)| *text).collect();
    let summary =
        format!("{} objects, {} custom resource(s) checked structurally", docs.len(), docs.len() - core.len());
    Ok(Checked {
        core_yaml: core.iter().map(|text| format!("---\n{text}\n")).collect(),
        summary,
        authorization: None,
        nats_server: None,
        service_envs: Vec::new(),
    })
}

/// The checked-in k8s/base/nats-authorization.conf is what `taskfleet nats-permissions` prints
/// for the prefixes of k8s/base/taskfleet.env, so it cannot drift from the fleet's permissions.
#[test]
fn nats_authorization_conf_is_generated() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory");
    let conf = std::fs::read_to_string(root.join("k8s/base/nats-authorization.conf")).expect("read authorization");
    let env_file = std::fs::read_to_string(root.join("k8s/base/taskfleet.env")).expect("read taskfleet.env");
    let prefixes: BTreeMap<String, String> = env_file
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| k.starts_with("TASKFLEET_") && k.ends_with("_PREFIX"))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let users: Vec<String> = conf_users(&conf).into_iter().map(|(user, _)| user).collect();
    assert_eq!(users, ["coordinator", "worker", "aggregator", "client", "admin"], "the fleet's five roles");
    if let Err(e) = Cli::new(root).check_authorization(&prefixes, &conf) {
        panic!("k8s/base/nats-authorization.conf: {e}");
    }
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

    fn yaml(text: &str) -> Value {
        serde_norway::from_str(text).expect("test YAML")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn network_policy_peers_follow_kubernetes_semantics() {
        let policy = yaml(
            r#"
spec:
  podSelector: {matchLabels: {app.kubernetes.io/name: nats}}
  ingress:
    - from:
        - podSelector: {matchLabels: {role: client}}
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: keda}}
          podSelector: {matchExpressions: [{key: app.kubernetes.io/name, operator: In, values: [keda-operator]}]}
      ports: [{port: client}, {protocol: TCP, port: 8000, endPort: 8300}]
"#,
        );
        let nats = labels(&[("app.kubernetes.io/name", "nats")]);
        let ports = BTreeMap::from([("client".to_owned(), 4222), ("cluster".to_owned(), 6222)]);
        let admit = |source: &Peer, port| policies_admit(&[&policy], &nats, &ports, port, source);
        let client = Peer::new("c", NAMESPACE, labels(&[("role", "client")]));
        let keda = Peer::new("k", "keda", labels(&[("app.kubernetes.io/name", "keda-operator")]));
        assert!(admit(&client, 4222), "named port, same-namespace pod selector");
        assert!(!admit(&client, 6222), "a port no rule lists");
        assert!(admit(&client, 8222) && admit(&keda, 8222), "endPort range");
        assert!(
            !admit(&Peer::new("c", "other", labels(&[("role", "client")])), 4222),
            "podSelector alone: own namespace"
        );
        assert!(!admit(&Peer::new("k", NAMESPACE, labels(&[("app.kubernetes.io/name", "keda-operator")])), 8222));
        let unselected = labels(&[("app.kubernetes.io/name", "redis")]);
        assert!(policies_admit(&[&policy], &unselected, &ports, 1, &keda), "pods no policy selects admit everything");
        assert!(
            !is_peer(&seq_at(&policy, &["spec", "ingress"])[0]["from"][1], "keda", "keda-operator"),
            "a peer counts as KEDA only in the exact matchLabels form"
        );
    }

    #[test]
    fn nats_conf_blocks_users_and_certificate_names() {
        let conf = strip_conf_comments(
            "http: 0.0.0.0:8222 # monitoring\ntls {\n  cert_file: \"/t/tls.crt\"\n}\ncluster {\n  routes: [\n    nats://a:6222\n  ]\n  tls {\n    verify: true\n  }\n}\ninclude \"authorization.conf\"\n",
        );
        let blocks = conf_blocks(&conf);
        assert_eq!(blocks[""]["http"], "0.0.0.0:8222");
        assert_eq!(blocks["tls"]["cert_file"], "\"/t/tls.crt\"");
        assert_eq!(blocks["cluster.tls"]["verify"], "true");
        assert!(!blocks["cluster"].contains_key("nats"), "array items are not entries");
        assert_eq!(strip_conf_comments("password: \"a#b\" # c"), "password: \"a#b\" ");
        let users = conf_users(
            "users = [\n { user: \"worker\"\n   password: $NATS_PASSWORD_WORKER\n }\n { user: \"x\"\n password: \"lit\" } ]",
        );
        assert_eq!(
            users,
            [("worker".to_owned(), "$NATS_PASSWORD_WORKER".to_owned()), ("x".to_owned(), "lit".to_owned())]
        );
        assert!(dns_name_covers("*.nats-headless", "nats-1.nats-headless"));
        assert!(
            !dns_name_covers("*.nats-headless", "nats-headless")
                && !dns_name_covers("*.nats-headless", "a.b.nats-headless")
        );
        assert!(dns_name_covers("nats", "nats") && !dns_name_covers("nats", "nats.taskfleet"));
    }
}
