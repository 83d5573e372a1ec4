//! Offline validation of the Kubernetes manifests (k8s/base and every overlay).
//!
//! Runs `deploy/k8s-validate.sh`, which renders each kustomization with
//! `kubectl kustomize`, validates the objects against the Kubernetes schemas
//! with `kubernetes-validate`, and checks the fleet's invariants (resources,
//! probes, security context, worker drain vs. grace period, no `latest` tag in
//! prod, HPA/KEDA exclusivity, NATS cluster routes, ...). No cluster needed.

use std::path::Path;
use std::process::Command;

#[test]
fn k8s_manifests_render_and_validate() {
    // CARGO_MANIFEST_DIR is <workspace>/tests; the script expects the root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory");
    let script = root.join("deploy").join("k8s-validate.sh");
    assert!(script.is_file(), "missing {}", script.display());

    let output = Command::new("bash")
        .arg(&script)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("could not run bash {}: {e}", script.display()));

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "deploy/k8s-validate.sh failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    // Shown with `cargo test -- --nocapture`.
    println!("{stdout}");
}
