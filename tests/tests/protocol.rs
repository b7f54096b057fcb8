//! The wire: mutual TLS, protocol versions, oversized and malformed frames.

use quern_proto::tls::{init_cluster_dir, ClusterFiles};
use quern_proto::transport::{Endpoint, Tuning};
use quern_tests::*;
use std::time::Duration;

async fn raw_exchange(c: &TestCluster, bytes: &[u8]) -> String {
    let ep = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    let (conn, _) = ep.connection(c.namenode_addr).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1 << 20).await.unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_cluster_certificate_are_refused() {
    let c = TestCluster::start(Options {
        datanodes: 1,
        ..Default::default()
    })
    .await;
    // No client certificate at all.
    let anon = c.admin_identity().without_certificate();
    let client = quern_client::Client::new(&anon, c.namenode_addr, Duration::from_secs(5)).unwrap();
    let err = client.list("/").await.unwrap_err().to_string();
    assert!(
        err.contains("TLS refused") || err.contains("certificate"),
        "{err}"
    );
    assert!(
        err.contains("namenode") || err.contains(&c.namenode_addr.to_string()),
        "{err}"
    );

    // A certificate from another cluster's CA.
    let other = tempfile::tempdir().unwrap();
    let files: ClusterFiles = init_cluster_dir(other.path()).unwrap();
    let client = quern_client::Client::new(
        &files.admin_identity().unwrap(),
        c.namenode_addr,
        Duration::from_secs(5),
    )
    .unwrap();
    let err = client.list("/").await.unwrap_err().to_string();
    assert!(err.contains("TLS refused"), "{err}");
    assert!(err.contains("cluster CA"), "{err}");

    // The real client still works, and nothing was created meanwhile.
    assert!(c.client().list("/").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_version_and_bad_frames_get_clear_errors() {
    let c = TestCluster::start(Options {
        datanodes: 1,
        ..Default::default()
    })
    .await;
    let reply = raw_exchange(&c, &99u32.to_be_bytes()).await;
    assert!(
        reply.contains("protocol version mismatch: the client speaks version 99"),
        "{reply}"
    );
    assert!(
        reply.contains(&format!(
            "namenode speaks version {}",
            quern_proto::PROTOCOL_VERSION
        )),
        "{reply}"
    );

    let mut oversized = quern_proto::PROTOCOL_VERSION.to_be_bytes().to_vec();
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    let reply = raw_exchange(&c, &oversized).await;
    assert!(reply.contains("exceeds the limit"), "{reply}");

    let mut garbage = quern_proto::PROTOCOL_VERSION.to_be_bytes().to_vec();
    garbage.extend_from_slice(&4u32.to_be_bytes());
    garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let reply = raw_exchange(&c, &garbage).await;
    assert!(reply.contains("could not read the request"), "{reply}");

    // The server is unharmed.
    c.client().mkdir("/still-fine", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_namenode_is_named_in_the_error() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let files = init_cluster_dir(dir.path()).unwrap();
    // Bind and drop a socket to get a port nobody listens on.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = quern_client::Client::new(
        &files.admin_identity().unwrap(),
        port,
        Duration::from_secs(3),
    )
    .unwrap();
    let err = client.list("/").await.unwrap_err().to_string();
    assert!(err.contains(&format!("namenode {port}")), "{err}");
    assert!(err.contains("is it running"), "{err}");
}

/// A request whose body is empty is whole once its frame is sent: a
/// server that answers before the caller gets to "send" the empty body
/// has succeeded, and the caller sees that answer, not a stopped stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_answered_early_is_still_a_success() {
    use quern_proto::msg::{ChunkMeta, WriteAck, WriteChunk};
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    let alloc = allocate_first_chunk(&admin, "/empty").await;
    let ep = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    let meta = ChunkMeta {
        id: alloc.chunk,
        size: 0,
        digest: quern_proto::Digest::of(b""),
    };
    let mut s = ep
        .request(
            alloc.targets[0],
            WriteChunk {
                meta,
                pipeline: Vec::new(),
                token: Some(alloc.token.clone()),
            },
        )
        .await
        .unwrap();
    // The datanode stores the empty chunk, answers and stops reading
    // while this caller is elsewhere.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.send_piece(bytes::Bytes::new()).await.unwrap();
    s.finish().unwrap();
    s.reply::<WriteAck>().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifeline_port_takes_heartbeats_only() {
    let c = TestCluster::start(Options {
        datanodes: 1,
        ..Default::default()
    })
    .await;
    let lifeline = c.namenode.as_ref().unwrap().lifeline_addr();
    assert_ne!(lifeline.port(), c.namenode_addr.port());
    let ep = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    let e = ep
        .call(
            quern_proto::transport::Peer::namenode(lifeline),
            quern_proto::msg::Stat { path: "/".into() },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lifeline") && e.contains("heartbeats only"),
        "{e}"
    );
    assert!(e.contains("stat"), "names what was sent: {e}");
}

/// A server on `addr` that accepts connections and keeps them, serving no
/// request; on the runtime it is called in.
fn hold_connections(
    identity: &quern_proto::tls::Identity,
    addr: std::net::SocketAddr,
) -> std::sync::Arc<Endpoint> {
    let server = std::sync::Arc::new(Endpoint::server(identity, addr, Tuning::tuned()).unwrap());
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            if let Ok(conn) = incoming.await {
                tokio::spawn(async move { conn.closed().await });
            }
        }
    });
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resets_old_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let files: ClusterFiles = init_cluster_dir(dir.path()).unwrap();
    let server_id = files.namenode_identity().unwrap();
    // The first server runs on a thread and runtime of its own, as in a
    // process of its own, which then dies without closing anything.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (die_tx, die_rx) = std::sync::mpsc::channel::<()>();
    let first_id = server_id.clone();
    let process = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = {
            let _inside = runtime.enter();
            hold_connections(&first_id, "127.0.0.1:0".parse().unwrap())
        };
        addr_tx.send(server.local_addr().unwrap()).unwrap();
        let _ = die_rx.recv();
        drop(server);
        drop(runtime);
    });
    let addr = addr_rx.recv().unwrap();
    let client = Endpoint::client(&files.admin_identity().unwrap(), Tuning::tuned()).unwrap();
    let (conn, _) = client.connection(addr).await.unwrap();
    die_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || process.join().unwrap())
        .await
        .unwrap();
    // Its successor: same identity, same port. A packet on the old
    // connection is answered with a reset the client can verify.
    let _second = hold_connections(&server_id, addr);
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(&[0u8; 512]).await;
    let t = std::time::Instant::now();
    let why = conn.closed().await;
    assert!(
        matches!(why, quinn::ConnectionError::Reset),
        "closed by {why:?}"
    );
    // QUIC's idle timeout is 10 s; a reset comes in a round trip.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A new connection to the successor works.
    client.forget(addr);
    client.connection(addr).await.unwrap();
}

/// A server that reports who each connection it accepts comes from, as
/// the client's certificate chain on it says.
fn report_clients(
    identity: &quern_proto::tls::Identity,
) -> (
    std::sync::Arc<Endpoint>,
    tokio::sync::mpsc::UnboundedReceiver<Option<quern_proto::Principal>>,
) {
    let server = std::sync::Arc::new(
        Endpoint::server(identity, "127.0.0.1:0".parse().unwrap(), Tuning::tuned()).unwrap(),
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let accepting = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            if let Ok(conn) = incoming.await {
                let _ = tx.send(quern_proto::transport::peer_principal(&conn).ok());
                tokio::spawn(async move { conn.closed().await });
            }
        }
    });
    (server, rx)
}

/// The namenode's lifeline shares its session tickets with the main
/// endpoint, so a datanode that registered resumes its TLS session there
/// (no certificate signed or verified again; in `bench namenode` the
/// lifeline thread's ECDSA work is gone). What a resumed session must
/// still give the server is who the client is, from the ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_at_the_lifeline_still_names_its_client() {
    let dir = tempfile::tempdir().unwrap();
    let files: ClusterFiles = init_cluster_dir(dir.path()).unwrap();
    let namenode = files.namenode_identity().unwrap();
    let (main, mut main_seen) = report_clients(&namenode);
    let (lifeline, mut lifeline_seen) = report_clients(&namenode);
    // Another server of the cluster, which cannot read those tickets.
    let (other, mut other_seen) = report_clients(&files.namenode_identity().unwrap());
    let admin = files.admin_identity().unwrap();
    let client = Endpoint::client(&admin, Tuning::tuned()).unwrap();
    let me = Some(admin.principal().unwrap());
    client.connection(main.local_addr().unwrap()).await.unwrap();
    assert_eq!(main_seen.recv().await, Some(me.clone()));
    // The server's tickets come just after the handshake.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (server, seen) in [(&lifeline, &mut lifeline_seen), (&other, &mut other_seen)] {
        let (_, them) = client
            .connection(server.local_addr().unwrap())
            .await
            .unwrap();
        assert_eq!(them.role, quern_proto::Role::Namenode);
        assert_eq!(seen.recv().await, Some(me.clone()));
    }
}
