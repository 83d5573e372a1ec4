//! A private three-node JetStream cluster on loopback, for tests that kill NATS nodes.

use crate::nats_server_binary;
use crate::process::{free_port, http_get};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Nodes in a [`NatsCluster`].
pub const CLUSTER_SIZE: usize = 3;

/// One nats-server of the cluster: its ports, config file, store and log.
struct Node {
    name: String,
    port: u16,
    monitor_port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Three nats-server processes on 127.0.0.1 forming one JetStream cluster, each with its own
/// config file and store directory in a temporary directory. [`NatsCluster::kill`] SIGKILLs a
/// node, [`NatsCluster::restart`] starts it again on the same ports and store. Dropping the
/// cluster kills every node and removes the directory.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the cluster and waits until every node reports JetStream healthy (a meta leader
    /// elected and known to all).
    pub fn start() -> NatsCluster {
        NatsCluster::start_with("")
    }

    /// As [`NatsCluster::start`], with `extra` (nats.conf text, e.g. an `authorization { … }`
    /// block) appended to every node's config file.
    pub fn start_with(extra: &str) -> NatsCluster {
        let dir = tempfile::tempdir().expect("temp dir for the NATS cluster");
        let ports: Vec<(u16, u16, u16)> = (0..CLUSTER_SIZE).map(|_| (free_port(), free_port(), free_port())).collect();
        let mut nodes = Vec::with_capacity(CLUSTER_SIZE);
        for (i, &(port, cluster_port, monitor_port)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let store = dir.path().join(format!("{name}-store"));
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{}", p.1))
                .collect();
            let text = node_config(&name, port, cluster_port, monitor_port, &store, &routes, extra);
            let conf = dir.path().join(format!("{name}.conf"));
            std::fs::write(&conf, text).expect("write nats-server config");
            let log = dir.path().join(format!("{name}.log"));
            nodes.push(Node { name, port, monitor_port, conf, log, child: None });
        }
        let mut cluster = NatsCluster { nodes, dir };
        for i in 0..CLUSTER_SIZE {
            cluster.spawn(i);
        }
        if let Err(why) = cluster.wait_healthy(Duration::from_secs(30)) {
            panic!("NATS cluster did not form: {why}");
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let bin = nats_server_binary();
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).expect("nats-server log file");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&node.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("nats-server log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e} (run deploy/dev-services.sh)", bin.display()));
        node.child = Some(child);
        let port = node.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                panic!("nats-server {} did not listen on port {port}; log:\n{}", self.nodes[i].name, self.log(i));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URLs of all nodes: `nats://127.0.0.1:a,nats://127.0.0.1:b,nats://127.0.0.1:c`.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// The client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The `server_name` of node `i` (`n0`, `n1`, `n2`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Kills node `i` with SIGKILL; its store stays for [`NatsCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again (killing it first if it runs) with the same ports, config and
    /// store, and returns once it listens; [`NatsCluster::wait_healthy`] waits for it to rejoin.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// True while node `i` runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until every running node answers 200 on `/healthz` (JetStream knows its meta
    /// leader and every stream and consumer replica on the node is current), and at least two
    /// nodes run. The error names the nodes not healthy at the deadline and what they said.
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut unhealthy = Vec::new();
            let mut running = 0;
            for i in 0..self.nodes.len() {
                if !self.is_running(i) {
                    continue;
                }
                running += 1;
                let addr = format!("127.0.0.1:{}", self.nodes[i].monitor_port);
                match http_get(&addr, "/healthz") {
                    Ok((200, _)) => {}
                    Ok((status, body)) => unhealthy.push(format!("{}: {status} {}", self.nodes[i].name, body.trim())),
                    Err(e) => unhealthy.push(format!("{}: {e}", self.nodes[i].name)),
                }
            }
            if unhealthy.is_empty() && running * 2 > self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{running} of {} nodes running; not healthy: {}",
                    self.nodes.len(),
                    unhealthy.join("; ")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What node `i` has logged so far (every run of it).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The temporary directory holding the config files, stores and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// The config file of one node.
fn node_config(
    name: &str,
    port: u16,
    cluster_port: u16,
    monitor_port: u16,
    store: &Path,
    routes: &[String],
    extra: &str,
) -> String {
    let route_lines: Vec<String> = routes.iter().map(|r| format!("    \"{r}\"")).collect();
    format!(
        "server_name: \"{name}\"\n\
         listen: \"127.0.0.1:{port}\"\n\
         http: \"127.0.0.1:{monitor_port}\"\n\
         jetstream {{\n  store_dir: \"{store}\"\n}}\n\
         cluster {{\n  name: \"taskfleet_test\"\n  listen: \"127.0.0.1:{cluster_port}\"\n  routes: [\n{routes}\n  ]\n}}\n\
         {extra}\n",
        store = store.display(),
        routes = route_lines.join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_routes_to_the_other_two_and_keeps_the_extra_text() {
        let routes = vec!["nats-route://127.0.0.1:2".to_string(), "nats-route://127.0.0.1:3".to_string()];
        let text = node_config("n0", 1, 4, 5, Path::new("/tmp/s0"), &routes, "authorization { token: t }");
        assert!(text.contains("server_name: \"n0\""), "{text}");
        assert!(text.contains("listen: \"127.0.0.1:1\""), "{text}");
        assert!(text.contains("listen: \"127.0.0.1:4\""), "{text}");
        assert!(text.contains("http: \"127.0.0.1:5\""), "{text}");
        assert!(text.contains("store_dir: \"/tmp/s0\""), "{text}");
        assert!(text.contains("\"nats-route://127.0.0.1:2\"\n    \"nats-route://127.0.0.1:3\""), "{text}");
        assert!(text.ends_with("authorization { token: t }\n"), "{text}");
    }
}
