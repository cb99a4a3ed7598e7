//! Postgres transport: the options of the TCP connections sqlx opens to
//! Postgres, read from this process's own sockets.

use std::{net::SocketAddr, os::fd::OwnedFd};

use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
use sqlx::postgres::PgPoolOptions;

/// Every open TCP socket of this process whose peer listens on `port`, as
/// a duplicate descriptor (its options are the socket's own).
fn sockets_to(port: u16) -> Vec<(SocketAddr, OwnedFd)> {
    let me = pidfd_open(getpid(), PidfdFlags::empty()).expect("a pidfd of this process");
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd") {
        let entry = entry.expect("a descriptor");
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        let duplicate = match pidfd_getfd(&me, fd, PidfdGetfdFlags::empty()) {
            Ok(duplicate) => duplicate,
            // It closed since the listing.
            Err(rustix::io::Errno::BADF) => continue,
            Err(e) => panic!(
                "pidfd_getfd on this process's own descriptor {fd} failed ({e}): \
                 it needs Linux 5.6 and may be refused by a seccomp profile"
            ),
        };
        let peer = socket2::SockRef::from(&duplicate)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket());
        if let Some(peer) = peer.filter(|p| p.port() == port) {
            found.push((peer, duplicate));
        }
    }
    found
}

/// sqlx-core 0.9.0 dropped TCP_NODELAY on its connections (sqlx issue
/// 4335). sqlx writes a statement's Sync in a write of its own after its
/// Bind and Execute; with Nagle's algorithm on, the Sync waits until
/// Postgres acknowledges the statement, and Postgres, with nothing to
/// answer before the Sync, may delay that ACK (40 ms on Linux). Measured on
/// webhook intake (release build, 16 connections): one answer in eight
/// took 40 ms more, p99 46 ms and 0.24 × the floor, against p99 2.6 ms and
/// 0.56 × with the option set. vendor/sqlx-core sets it again
/// (vendor/README.md). Whether a given write stalls depends on the
/// kernel's ACK timing, so this reads the option itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_to_postgres_disables_nagles_algorithm() {
    let url = entitle_tests::admin_database_url();
    let port = reqwest::Url::parse(&url)
        .expect("DATABASE_URL is a URL")
        .port()
        .unwrap_or(5432);
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .min_connections(3)
        .connect(&url)
        .await
        .expect("Postgres is reachable at DATABASE_URL");
    let held: Vec<_> = futures::future::try_join_all((0..3).map(|_| pool.acquire()))
        .await
        .expect("three connections");

    let sockets = sockets_to(port);
    assert!(
        sockets.len() >= 3,
        "found {} sockets to port {port}; Postgres is reached over TCP in tests",
        sockets.len()
    );
    for (peer, socket) in &sockets {
        let nodelay = socket2::SockRef::from(socket)
            .tcp_nodelay()
            .expect("TCP_NODELAY can be read");
        assert!(
            nodelay,
            "the connection to {peer} has Nagle's algorithm on: statements wait for delayed ACKs"
        );
    }
    drop(held);
}
