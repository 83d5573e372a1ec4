//! NATS over TLS with certificates the test makes itself (openssl): a CA, a server certificate
//! for 127.0.0.1 and a client certificate, on a nats-server that requires TLS and verifies
//! client certificates (mutual TLS) besides the fleet's users and permissions. The coordinator,
//! a worker and the CLI run tasks over it; a client that does not trust the CA, or has no
//! client certificate, is refused, and a worker without the CA never becomes ready and says why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use taskfleet_e2e::Fleet;
use taskfleet_proto::Role;
use taskfleet_test_support::{FleetProcess, NatsServer, free_port, http_get, role_password, test_authorization};

/// PEM files of one test PKI.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate (IP 127.0.0.1, DNS localhost) and a client certificate, both
/// signed by the CA.
fn make_pki() -> Pki {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=taskfleet test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    std::fs::write(d.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        .expect("write server.ext");
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("write client.ext");
    for name in ["server", "client"] {
        let (key, csr, crt, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"), format!("{name}.ext"));
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=taskfleet {name}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
    }
    Pki {
        ca: d.join("ca.crt"),
        server_cert: d.join("server.crt"),
        server_key: d.join("server.key"),
        client_cert: d.join("client.crt"),
        client_key: d.join("client.key"),
        _dir: dir,
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_runs_over_mutual_tls_and_untrusted_clients_are_refused() {
    let pki = make_pki();
    let mut fleet = Fleet::new("tls");
    let tls = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}\n",
        pki.server_cert, pki.server_key, pki.ca
    );
    fleet.env.nats = NatsServer::start_with(Some(tls + &test_authorization(&fleet.subjects())));
    let url = fleet.env.nats.url.clone();
    fleet
        .set("TASKFLEET_NATS_TLS_CA_FILE", path(&pki.ca))
        .set("TASKFLEET_NATS_TLS_CERT_FILE", path(&pki.client_cert))
        .set("TASKFLEET_NATS_TLS_KEY_FILE", path(&pki.client_key));
    fleet.start_coordinator();
    fleet.start_worker(&[]);

    // The CLI (logged in as admin, with the CA and its certificate) runs tasks end to end.
    let out = fleet.cli(&["submit", "--kind", "echo", "--count", "50", "--wait", "--timeout", "60s"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "submit over TLS: {stdout}\n{stderr}\n{}", fleet.logs());
    let pool = fleet.env.pg_pool().await;
    assert_eq!(fleet.counts(&pool).await.get("succeeded"), Some(&50), "{}", fleet.logs());

    // Refused: a client that trusts only the system's roots, one that trusts the CA but has no
    // certificate of its own, and one with both but the wrong password.
    let admin = || async_nats::ConnectOptions::with_user_and_password("admin".into(), role_password(Role::Admin));
    let attempts = [
        ("no CA", admin().require_tls(true)),
        ("no client certificate", admin().add_root_certificates(pki.ca.clone()).require_tls(true)),
        (
            "wrong password",
            async_nats::ConnectOptions::with_user_and_password("admin".into(), "guess".into())
                .add_root_certificates(pki.ca.clone())
                .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
                .require_tls(true),
        ),
    ];
    for (what, options) in attempts {
        let connected = tokio::time::timeout(Duration::from_secs(10), options.connect(url.as_str())).await;
        match connected {
            Ok(Ok(_)) => panic!("a client with {what} connected"),
            Ok(Err(e)) => println!("{what}: refused: {e}"),
            Err(_) => println!("{what}: refused (no connection within 10 s)"),
        }
    }
    // The control: CA, certificate and password together connect.
    admin()
        .add_root_certificates(pki.ca.clone())
        .add_client_certificate(pki.client_cert.clone(), pki.client_key.clone())
        .require_tls(true)
        .connect(url.as_str())
        .await
        .expect("CA, client certificate and password connect");

    // A worker that does not trust the CA is never ready, and its log says why.
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env: Vec<(String, String)> = fleet.env.fleet_env();
    env.push(("TASKFLEET_WORKER_HTTP_ADDR".into(), addr.clone()));
    env.push(("TASKFLEET_NATS_TLS_CERT_FILE".into(), path(&pki.client_cert).into()));
    env.push(("TASKFLEET_NATS_TLS_KEY_FILE".into(), path(&pki.client_key).into()));
    let mut untrusting = FleetProcess::spawn("taskfleet-worker", &[], &env);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ready = http_get(&addr, "/readyz").map(|(status, _)| status).unwrap_or(0);
    assert_ne!(ready, 200, "a worker that does not trust the server's CA is ready\n{}", untrusting.log());
    let log = untrusting.log().to_lowercase();
    assert!(log.contains("certificate") || log.contains("tls"), "no TLS error in the log:\n{log}");
    untrusting.kill();
}
