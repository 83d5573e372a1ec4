//! TCP_NODELAY for the pool's connections.
//!
//! sqlx 0.9 opens Postgres TCP connections without `TCP_NODELAY`, so Nagle's algorithm holds
//! back the tail of any statement larger than one segment until the server acknowledges the
//! previous one, and the server delays that acknowledgement (up to 40 ms on Linux). The batched
//! `UNNEST` statements are exactly that size: with task results of ~100 bytes, end-to-end
//! throughput fell from ~11,000 to ~2,300 tasks/s. sqlx does not expose its socket, so after
//! each new connection this sets the option on every TCP socket of the process (harmless for the
//! others: NATS connections already have it, and small-message protocols all want it).

/// Sets `TCP_NODELAY` on every TCP socket this process has open; returns how many accepted it.
#[cfg(target_os = "linux")]
pub(crate) fn set_on_tcp_sockets() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    let mut set = 0;
    for entry in dir.flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<libc::c_int>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        let one: libc::c_int = 1;
        // SAFETY: setsockopt only reads `one` (a live local of the size passed). On a socket
        // that is not TCP, or an fd closed meanwhile, it fails with an error that is ignored; it
        // never touches memory or changes anything but this one socket option.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            set += 1;
        }
    }
    set
}

/// Elsewhere the option stays as sqlx leaves it.
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_on_tcp_sockets() -> usize {
    0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn sets_the_option_on_tcp_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(!stream.nodelay().unwrap());
        assert!(super::set_on_tcp_sockets() >= 2);
        assert!(stream.nodelay().unwrap());
    }
}
