//! The example workloads (`examples/`, `taskfleet-examples`) at small scale on a private fleet:
//! each must meet its figure (the program exits 1 when a figure misses its target).

use std::process::Command;
use std::time::Instant;
use taskfleet_e2e::Fleet;

/// Runs one example quickly against a fresh fleet (coordinator and aggregator; the example
/// brings its own worker and stand-in APIs) and checks that every figure passed.
fn run_example(name: &str) {
    let mut fleet = Fleet::new(&format!("ex_{name}"));
    fleet.start_coordinator();
    fleet.start_aggregator();
    let bin = taskfleet_test_support::target_dir().join("taskfleet-examples");
    let started = Instant::now();
    let out = Command::new(bin)
        .args([name, "--quick"])
        .envs(fleet.env.fleet_env())
        .envs(taskfleet_test_support::role_credentials("taskfleet-examples", &fleet.env.fleet_env()))
        .env("TASKFLEET_AGGREGATOR_URL", format!("http://{}", fleet.aggregator_http))
        .output()
        .expect("run taskfleet-examples");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{name} ({:.1} s):\n{stdout}", started.elapsed().as_secs_f64());
    assert!(
        out.status.success(),
        "the {name} example missed a figure or failed:\n{stdout}\n{stderr}\n{}",
        fleet.logs()
    );
    assert!(stdout.contains(&format!("| {name} |")), "no rows printed:\n{stdout}");
}

#[test]
fn research() {
    run_example("research");
}

#[test]
fn quorum() {
    run_example("quorum");
}

#[test]
fn content() {
    run_example("content");
}

#[test]
fn document() {
    run_example("document");
}

#[test]
fn beam() {
    run_example("beam");
}
