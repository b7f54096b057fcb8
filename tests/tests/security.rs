//! Roles, chunk access tokens and permissions, on in-process clusters with
//! real QUIC and real certificates.

use quern_client::WriteOptions;
use quern_proto::msg::*;
use quern_proto::transport::{Endpoint, Peer, Tuning};
use quern_proto::{ErrorCode, NodeId, Principal, Role};
use quern_tests::*;
use std::time::Duration;

fn code_of(e: &quern_proto::Error) -> Option<ErrorCode> {
    e.code()
}

async fn put(client: &quern_client::Client, path: &str, data: &[u8], mode: u32) {
    let mut w = client
        .create(
            path,
            WriteOptions {
                replication: 2,
                chunk_size: 64 << 10,
                overwrite: false,
                mode,
            },
        )
        .await
        .unwrap();
    w.write(data).await.unwrap();
    w.close().await.unwrap();
}

fn replicas(loc: &FileLocations) -> Vec<Vec<NodeId>> {
    loc.chunks
        .iter()
        .map(|c| {
            let mut v: Vec<NodeId> = c.replicas.iter().map(|r| r.node.id).collect();
            v.sort();
            v
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datanode_requests_need_the_datanodes_own_certificate() {
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    put(&admin, "/f", &random_bytes(200_000, 1), 0o644).await;
    let before = admin.locate("/f").await.unwrap();
    let real = before.chunks[0].replicas[0].node;
    let chunks: Vec<StoredChunk> = before
        .chunks
        .iter()
        .map(|ch| StoredChunk {
            id: ch.meta.id,
            size: ch.meta.size,
            digest: ch.meta.digest,
        })
        .collect();
    let register = |id: NodeId, chunks: Vec<StoredChunk>| Register {
        cluster_id: None,
        node: NodeAddr {
            id,
            addr: "127.0.0.1:9".parse().unwrap(),
        },
        capacity: 1 << 40,
        available: 1 << 40,
        chunks: quern_proto::report::PackedChunks::pack(&chunks),
        report_follows: false,
    };
    let nn = Peer::namenode(c.namenode_addr);

    // A user's certificate cannot register, report or heartbeat as a datanode.
    let user = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    let e = user
        .call(nn, register(real.id, chunks.clone()))
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::PermissionDenied), "{e}");
    assert!(e.to_string().contains("for datanodes"), "{e}");
    let e = user
        .call(
            nn,
            Heartbeat {
                node: real.id,
                capacity: 0,
                available: 0,
                used: 0,
                chunks: 0,
                trash_bytes: 0,
                scrub: Default::default(),
                full: false,
                jobs: 0,
                job_bytes: 0,
                gflops: 0.0,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::PermissionDenied), "{e}");

    // Another datanode's certificate cannot speak for the real one.
    let rogue_id = NodeId(0x0bad);
    let rogue = c
        .files
        .issue("rogue", &Principal::new(Role::Datanode(rogue_id)))
        .unwrap();
    let rogue = Endpoint::client(&rogue, Tuning::tuned()).unwrap();
    let e = rogue
        .call(nn, register(real.id, chunks.clone()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("certificate of datanode"), "{e}");
    let e = rogue
        .call(
            nn,
            ChunkReport {
                node: real.id,
                chunks: Default::default(),
                first: true,
                last: true,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::PermissionDenied), "{e}");
    let e = rogue
        .call(nn, ReportTurn { node: real.id })
        .await
        .unwrap_err();
    assert_eq!(code_of(&e), Some(ErrorCode::PermissionDenied), "{e}");

    // Under its own name, a report of chunks it never received (it cannot
    // know their digests) adds no replica; nor does an empty report under
    // the real node's name remove any.
    let forged: Vec<StoredChunk> = chunks
        .iter()
        .map(|s| StoredChunk {
            digest: quern_proto::Digest([7; 32]),
            ..*s
        })
        .collect();
    let reply = rogue.call(nn, register(rogue_id, forged)).await.unwrap();
    assert!(reply.commands.is_empty(), "{:?}", reply.commands);
    let after = admin.locate("/f").await.unwrap();
    assert_eq!(replicas(&before), replicas(&after));
    assert!(after
        .chunks
        .iter()
        .all(|ch| ch.replicas.iter().all(|r| r.node.id != rogue_id)));
    assert_eq!(
        admin.read_all("/f").await.unwrap(),
        random_bytes(200_000, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_reads_and_writes_need_a_valid_token() {
    let c = TestCluster::start(Options {
        token_lifetime: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let admin = c.client();
    let data = random_bytes(100_000, 2);
    put(&admin, "/a", &data, 0o644).await;
    put(&admin, "/b", &random_bytes(10, 3), 0o644).await;
    let a = admin.locate("/a").await.unwrap();
    let b = admin.locate("/b").await.unwrap();
    let chunk = &a.chunks[0];
    let holder = chunk.replicas[0].node;
    let path = c
        .chunk_files()
        .into_iter()
        .find(|p| {
            p.to_string_lossy()
                .contains(&format!("{:016x}", chunk.meta.id.0))
        })
        .expect("chunk file");
    let stored = std::fs::read(&path).unwrap();
    let ep = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();

    let read = |token: Option<quern_proto::ChunkToken>| ReadChunk {
        chunk: chunk.meta.id,
        offset: 0,
        len: None,
        token,
    };
    let write = |token: Option<quern_proto::ChunkToken>| WriteChunk {
        meta: ChunkMeta {
            id: chunk.meta.id,
            size: 4,
            digest: quern_proto::Digest::of(b"evil"),
        },
        pipeline: Vec::new(),
        token,
    };
    let refused = |r: Result<ReadHeader, quern_proto::Error>, what: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    };
    // The token locate handed out works.
    ep.call(holder, read(Some(chunk.token.clone())))
        .await
        .unwrap();
    refused(ep.call(holder, read(None)).await, "no access token");
    refused(
        ep.call(holder, read(Some(b.chunks[0].token.clone()))).await,
        "the access token is for",
    );
    let mut forged = chunk.token.clone();
    forged.access = quern_proto::Access::WRITE;
    let e = ep.call(holder, write(Some(forged))).await.unwrap_err();
    assert!(e.to_string().contains("bad signature"), "{e}");
    // A read token does not write; no token does not write.
    let e = ep
        .call(holder, write(Some(chunk.token.clone())))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("allows read+task, not"), "{e}");
    let e = ep.call(holder, write(None)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
    // Tokens expire.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    refused(
        ep.call(holder, read(Some(chunk.token.clone()))).await,
        "expired",
    );
    assert_eq!(std::fs::read(&path).unwrap(), stored, "chunk unchanged");
    // A fresh locate gets fresh tokens.
    assert_eq!(admin.read_all("/a").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_never_replaces_a_committed_chunk() {
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    let alloc = allocate_first_chunk(&admin, "/w").await;
    let ep = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    let target = alloc.targets[0];
    let send = |data: &'static [u8]| {
        let ep = &ep;
        let token = alloc.token.clone();
        async move {
            let meta = ChunkMeta {
                id: alloc.chunk,
                size: data.len() as u64,
                digest: quern_proto::Digest::of(data),
            };
            let mut s = ep
                .request(
                    target,
                    WriteChunk {
                        meta,
                        pipeline: Vec::new(),
                        token: Some(token),
                    },
                )
                .await?;
            s.send_piece(bytes::Bytes::from_static(data)).await?;
            s.finish()?;
            s.reply::<WriteAck>().await
        }
    };
    send(b"first").await.unwrap();
    let e = send(b"second").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::AlreadyExists), "{e}");
    assert!(e.to_string().contains("never replaces"), "{e}");
    let files = c.chunk_files();
    assert_eq!(files.len(), 1);
    assert_eq!(std::fs::read(&files[0]).unwrap(), b"first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_get_hdfs_permissions() {
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    let alice = c.user_client("alice");
    let bob = c.user_client("bob");
    admin.mkdir("/user/bob", true).await.unwrap();
    admin
        .set_owner("/user/bob", Some("bob".into()), None)
        .await
        .unwrap();
    put(&bob, "/user/bob/secret", b"bob's secret", 0o600).await;
    put(&bob, "/user/bob/public", b"bob's public", 0o644).await;
    let st = bob.stat("/user/bob/secret").await.unwrap();
    assert_eq!((st.owner.as_str(), st.mode), ("bob", 0o600));

    let denied = |e: quern_client::Error, want: &str| {
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{e}");
        let text = e.to_string();
        assert!(text.contains(want), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
    };
    denied(
        alice.read_all("/user/bob/secret").await.unwrap_err(),
        "permission denied: /user/bob/secret (owner bob, mode 0600)",
    );
    assert_eq!(
        alice.read_all("/user/bob/public").await.unwrap(),
        b"bob's public"
    );
    denied(
        alice.delete("/user/bob/public", false).await.unwrap_err(),
        "permission denied: /user/bob (owner bob, mode 0755)",
    );
    let e = alice
        .create(
            "/user/bob/public",
            WriteOptions {
                overwrite: true,
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap();
    denied(e, "permission denied: /user/bob (owner bob, mode 0755)");
    denied(
        alice
            .rename("/user/bob/public", "/user/bob/mine", false)
            .await
            .unwrap_err(),
        "permission denied",
    );
    denied(
        alice
            .set_attr("/user/bob/public", Some(0o666), None)
            .await
            .unwrap_err(),
        "only its owner may change its mode",
    );
    denied(
        alice.mkdir("/alice", false).await.unwrap_err(),
        "permission denied: / ",
    );
    denied(
        bob.set_owner("/user/bob/public", Some("alice".into()), None)
            .await
            .unwrap_err(),
        "only the admin",
    );
    // The admin can give the file away; then it is alice's to change.
    admin
        .set_owner("/user/bob/public", Some("alice".into()), None)
        .await
        .unwrap();
    alice
        .set_attr("/user/bob/public", Some(0o600), None)
        .await
        .unwrap();
    denied(
        bob.read_all("/user/bob/public").await.unwrap_err(),
        "(owner alice, mode 0600)",
    );
    // mkdir -p: an existing directory needs nothing; new ones need w on
    // the deepest existing one.
    bob.mkdir("/user/bob/a/b", true).await.unwrap();
    alice.mkdir("/user/bob", true).await.unwrap();
    denied(
        alice.mkdir("/user/bob/c/d", true).await.unwrap_err(),
        "permission denied: /user/bob (owner bob, mode 0755)",
    );
    // Without x on a directory nothing in it can be reached.
    bob.set_attr("/user/bob", Some(0o700), None).await.unwrap();
    denied(
        alice.stat("/user/bob/public").await.unwrap_err(),
        "alice may not enter it",
    );
    // Everything stayed as it was.
    assert_eq!(
        admin.read_all("/user/bob/secret").await.unwrap(),
        b"bob's secret"
    );
    let names: Vec<String> = admin
        .list("/user/bob")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.path)
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datanode_restarted_on_a_new_port_is_taken_back_at_once() {
    let mut c = TestCluster::start(Options {
        datanodes: 2,
        ..Default::default()
    })
    .await;
    let old = c.datanodes[0].as_ref().unwrap().addr();
    c.stop_datanode(0);
    c.start_datanode(0).await;
    let new = c.datanodes[0].as_ref().unwrap().addr();
    assert_ne!(old, new);
    let client = c.client();
    // Well within the 30 s dead timeout: the old address is probed, not
    // waited out.
    wait_for(
        Duration::from_secs(10),
        "registration at the new address",
        || {
            let client = client.clone();
            async move {
                client.report().await.is_ok_and(|r| {
                    r.datanodes.len() == 2
                        && r.datanodes
                            .iter()
                            .any(|d| d.node.addr == new && d.state == NodeState::Live)
                })
            }
        },
    )
    .await;
}
