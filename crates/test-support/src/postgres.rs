//! A private Postgres cluster per test, for tests that stop Postgres under load: `initdb` into a
//! temporary directory, a postmaster on a free port listening on 127.0.0.1 only (and a socket in
//! the same directory), trust authentication, durability as in production (`fsync` and
//! `synchronous_commit` on). Postgres refuses to run as root, so as root the server binaries run
//! as the `postgres` OS user, which then owns the directory. Dropping it stops the server and
//! removes the directory.

use crate::process::free_port;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Name of the database [`PgCluster::start`] creates.
pub const PG_DATABASE: &str = "test";

/// A private Postgres cluster: started by [`PgCluster::start`], stopped and removed on drop.
pub struct PgCluster {
    /// `postgres://postgres@127.0.0.1:<port>/test`.
    pub url: String,
    /// The TCP port.
    pub port: u16,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// Creates the cluster (`initdb`), starts it and creates the database [`PG_DATABASE`].
    pub fn start() -> io::Result<PgCluster> {
        let bin = postgres_bin_dir()?;
        let run_as = if running_as_root() { Some(os_user_ids("postgres")?) } else { None };
        let dir = tempfile::Builder::new().prefix("taskfleet-pg").tempdir()?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let port = free_port();
        let cluster =
            PgCluster { url: format!("postgres://postgres@127.0.0.1:{port}/{PG_DATABASE}"), port, bin, run_as, dir };
        let data = cluster.data_dir();
        cluster
            .run("initdb", &["-D", path_str(&data)?, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"])?;
        cluster.start_again()?;
        cluster.run("createdb", &["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", PG_DATABASE])?;
        Ok(cluster)
    }

    /// Starts the server on the same port and data directory (after a stop), waiting until it
    /// accepts connections (crash recovery included).
    pub fn start_again(&self) -> io::Result<()> {
        let (data, dir) = (self.data_dir(), self.dir.path());
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=on -c synchronous_commit=on",
            self.port,
            path_str(dir)?
        );
        let log = dir.join("postgres.log");
        self.run("pg_ctl", &["-D", path_str(&data)?, "-l", path_str(&log)?, "-o", &options, "-w", "-t", "60", "start"])
            .map(drop)
            .map_err(|e| io::Error::other(format!("{e}\nserver log:\n{}", self.log())))
    }

    /// Stops the server at once, like a crash: no checkpoint, open transactions are lost and the
    /// next start runs crash recovery (`pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) -> io::Result<()> {
        self.run("pg_ctl", &["-D", path_str(&self.data_dir())?, "-m", "immediate", "-w", "stop"]).map(drop)
    }

    /// True while the postmaster runs (its pid file exists).
    pub fn is_running(&self) -> bool {
        self.data_dir().join("postmaster.pid").exists()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs one of the cluster's binaries (as `postgres` when we are root); an error carries
    /// its output.
    fn run(&self, tool: &str, args: &[&str]) -> io::Result<Output> {
        let exe = self.bin.join(tool);
        let mut cmd = match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).current_dir(self.dir.path()).output()?;
        if out.status.success() {
            return Ok(out);
        }
        Err(io::Error::other(format!(
            "{} {} failed ({}): {}{}",
            exe.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.stop_immediate();
        }
    }
}

/// `/usr/lib/postgresql/<newest version>/bin`, or `TASKFLEET_TEST_PG_BIN` when set.
pub fn postgres_bin_dir() -> io::Result<PathBuf> {
    if let Ok(dir) = std::env::var("TASKFLEET_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| root.join(v.to_string()).join("bin/initdb").is_file())
        .max()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no /usr/lib/postgresql/<version>/bin/initdb"))?;
    Ok(root.join(newest.to_string()).join("bin"))
}

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// (uid, gid) of an OS user, from `/etc/passwd`.
fn os_user_ids(user: &str) -> io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd_ids(&passwd, user)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no OS user {user:?} to run Postgres as")))
}

fn passwd_ids(passwd: &str, user: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || f[0] != user {
            return None;
        }
        Some((f[2].parse().ok()?, f[3].parse().ok()?))
    })
}

fn path_str(p: &Path) -> io::Result<&str> {
    p.to_str().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not UTF-8", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[test]
    fn passwd_lines_are_parsed() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\npostgres:x:101:104:PostgreSQL:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(passwd_ids(passwd, "postgres"), Some((101, 104)));
        assert_eq!(passwd_ids(passwd, "nobody"), None);
        assert_eq!(passwd_ids("bad:x:y:z", "bad"), None);
    }

    /// A committed row survives an immediate stop; the cluster answers on the same port after a
    /// restart, refuses connections while stopped, and its directory is gone after the drop.
    #[tokio::test]
    async fn committed_rows_survive_an_immediate_stop() {
        let pg = PgCluster::start().expect("private Postgres");
        let dir = pg.data_dir();
        let mut conn = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
        sqlx::query("CREATE TABLE t (v int)").execute(&mut conn).await.expect("create");
        sqlx::query("INSERT INTO t VALUES (42)").execute(&mut conn).await.expect("insert");
        drop(conn);

        pg.stop_immediate().expect("stop");
        assert!(!pg.is_running());
        assert!(sqlx::PgConnection::connect(&pg.url).await.is_err(), "stopped server still answers");
        pg.start_again().expect("start again");
        let mut conn = sqlx::PgConnection::connect(&pg.url).await.expect("reconnect");
        let v: i32 = sqlx::query_scalar("SELECT v FROM t").fetch_one(&mut conn).await.expect("select");
        assert_eq!(v, 42);
        let owner = std::fs::metadata(&dir).expect("data dir").uid();
        assert_ne!(owner, 0, "the server's files belong to a user other than root");
        drop(conn);
        drop(pg);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
