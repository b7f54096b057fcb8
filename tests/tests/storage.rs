//! Storage behaviour on in-process clusters with real QUIC sockets and real
//! files on disk.

use quern_client::{Client, WriteOptions};
use quern_proto::msg::{FileKind, Health, NodeState, ReplicaState, SafeModeAction};
use quern_proto::ErrorCode;
use quern_tests::*;
use std::time::Duration;

const CHUNK: u64 = 64 * 1024;

fn opts(replication: u8) -> WriteOptions {
    WriteOptions {
        replication,
        chunk_size: CHUNK,
        ..Default::default()
    }
}

async fn put(client: &Client, path: &str, data: &[u8], o: WriteOptions) {
    let mut w = client.create(path, o).await.expect("create");
    // Odd-sized writes so chunk boundaries fall inside write calls.
    for piece in data.chunks(10_007) {
        w.write(piece).await.expect("write");
    }
    w.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_round_trip_at_every_chunk_boundary() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let c64 = CHUNK as usize;
    for (i, len) in [0, 1, c64 - 1, c64, c64 + 1, 3 * c64 + 7]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(len, i as u64);
        let path = format!("/f{len}");
        put(&client, &path, &data, opts(3)).await;
        assert_eq!(client.read_all(&path).await.unwrap(), data, "{path}");
        let st = client.stat(&path).await.unwrap();
        assert_eq!(st.size, len as u64);
        assert_eq!(st.chunks as usize, len.div_ceil(c64));
        let loc = client.locate(&path).await.unwrap();
        for ch in &loc.chunks {
            let mut nodes: Vec<_> = ch.replicas.iter().map(|r| r.node.id).collect();
            nodes.sort();
            nodes.dedup();
            assert_eq!(
                nodes.len(),
                3,
                "three distinct holders for chunk {}",
                ch.index
            );
        }
    }
    let fsck = client.fsck("/").await.unwrap();
    assert_eq!(fsck.health, Health::Healthy, "{fsck:?}");
    assert_eq!(fsck.files.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_invisible_until_closed_and_abandoned_chunks_are_reclaimed() {
    let c = TestCluster::start(Options {
        lease_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let client = c.client();
    let mut w = client.create("/pending", opts(2)).await.unwrap();
    w.write(&random_bytes(3 * CHUNK as usize, 1)).await.unwrap();
    // Two chunks are uploaded (the third waits in the buffer) yet nothing shows.
    wait_for(Duration::from_secs(10), "chunks on disk", || async {
        c.chunk_files().len() >= 2
    })
    .await;
    assert!(client.try_stat("/pending").await.unwrap().is_none());
    assert!(client.list("/").await.unwrap().is_empty());
    // The writer vanishes without closing: its lease lapses, the chunks go.
    drop(w);
    wait_for(
        Duration::from_secs(15),
        "orphan chunks to be deleted",
        || async { c.chunk_files().is_empty() },
    )
    .await;
    assert!(client.try_stat("/pending").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_datanodes_than_replication_is_under_replicated() {
    let c = TestCluster::start(Options {
        datanodes: 2,
        ..Default::default()
    })
    .await;
    let client = c.client();
    let data = random_bytes(100_000, 3);
    put(&client, "/two", &data, opts(3)).await;
    assert_eq!(client.read_all("/two").await.unwrap(), data);
    let fsck = client.fsck("/").await.unwrap();
    assert_eq!(fsck.health, Health::UnderReplicated);
    assert_eq!(fsck.under_replicated_chunks, 2);
    assert!(
        fsck.files[0].problems[0].contains("2 of 3 replicas live"),
        "{:?}",
        fsck.files[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_replica_is_skipped_reported_and_shown_by_fsck() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let data = random_bytes(CHUNK as usize, 4);
    put(&client, "/c", &data, opts(3)).await;
    let loc = client.locate("/c").await.unwrap();
    let chunk = &loc.chunks[0];
    // Flip a byte in the replica a reader tries first.
    let first = chunk.replicas[0].node.id;
    let idx = c
        .datanodes
        .iter()
        .position(|d| d.as_ref().is_some_and(|d| d.id() == first))
        .unwrap();
    let file = c.datanodes[idx]
        .as_ref()
        .unwrap()
        .store()
        .data_path(chunk.meta.id);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1234] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();

    assert_eq!(client.read_all("/c").await.unwrap(), data);
    let fsck = client.fsck("/").await.unwrap();
    assert_eq!(fsck.health, Health::Corrupt, "{fsck:?}");
    assert_eq!(fsck.corrupt_replicas, 1);
    assert!(fsck.files[0].problems[0].contains(&first.to_string()));
    let loc = client.locate("/c").await.unwrap();
    let bad = loc.chunks[0]
        .replicas
        .iter()
        .find(|r| r.node.id == first)
        .unwrap();
    assert_eq!(bad.state, ReplicaState::Corrupt);
    assert_eq!(loc.chunks[0].replicas[0].state, ReplicaState::Live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_dead_datanode_and_report_marks_it_dead() {
    let mut c = TestCluster::start(Options {
        dead_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let client = c.client();
    let data = random_bytes(3 * CHUNK as usize + 5, 5);
    put(&client, "/d", &data, opts(3)).await;
    c.stop_datanode(0);
    // Before the namenode notices, the reader fails over by itself.
    assert_eq!(client.read_all("/d").await.unwrap(), data);
    wait_for(
        Duration::from_secs(10),
        "the datanode to be marked dead",
        || {
            let client = client.clone();
            async move {
                let r = client.report().await.unwrap();
                r.datanodes
                    .iter()
                    .filter(|d| d.state == NodeState::Dead)
                    .count()
                    == 1
            }
        },
    )
    .await;
    let loc = client.locate("/d").await.unwrap();
    for ch in &loc.chunks {
        assert_eq!(ch.replicas.last().unwrap().state, ReplicaState::Dead);
    }
    assert_eq!(client.read_all("/d").await.unwrap(), data);
    assert_eq!(
        client.fsck("/").await.unwrap().health,
        Health::UnderReplicated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replicas_are_copied_again_and_setrep_trims_extras() {
    let mut c = TestCluster::start(Options {
        datanodes: 4,
        dead_timeout: Duration::from_secs(2),
        replication_interval: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let client = c.client();
    let data = random_bytes(2 * CHUNK as usize, 6);
    put(&client, "/r", &data, opts(2)).await;
    let holder = client.locate("/r").await.unwrap().chunks[0].replicas[0]
        .node
        .id;
    let idx = c
        .datanodes
        .iter()
        .position(|d| d.as_ref().is_some_and(|d| d.id() == holder))
        .unwrap();
    c.stop_datanode(idx);
    wait_for(
        Duration::from_secs(10),
        "the namenode to see the node dead",
        || {
            let client = client.clone();
            async move {
                let r = client.report().await.unwrap();
                r.datanodes.iter().any(|d| d.state == NodeState::Dead)
            }
        },
    )
    .await;
    wait_for(
        Duration::from_secs(20),
        "re-replication to heal the file",
        || {
            let client = client.clone();
            async move { client.fsck("/").await.unwrap().health == Health::Healthy }
        },
    )
    .await;
    assert_eq!(client.read_all("/r").await.unwrap(), data);

    client.set_replication("/r", 1).await.unwrap();
    wait_for(
        Duration::from_secs(20),
        "extra replicas to be dropped",
        || {
            let client = client.clone();
            async move {
                let loc = client.locate("/r").await.unwrap();
                loc.chunks.iter().all(|ch| {
                    ch.replicas
                        .iter()
                        .filter(|r| r.state == ReplicaState::Live)
                        .count()
                        == 1
                })
            }
        },
    )
    .await;
    assert_eq!(client.read_all("/r").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_errors_name_the_path_and_change_nothing() {
    let c = TestCluster::start(Options {
        datanodes: 1,
        ..Default::default()
    })
    .await;
    let client = c.client();
    client.mkdir("/dir/sub", true).await.unwrap();
    put(&client, "/dir/file", b"hello", opts(1)).await;
    let before = client.fsck("/").await.unwrap();

    let cases: Vec<(quern_client::Result<()>, ErrorCode, &str)> = vec![
        (
            client.mkdir("/dir", false).await,
            ErrorCode::AlreadyExists,
            "/dir: already exists",
        ),
        (
            client.mkdir("/x/y", false).await,
            ErrorCode::NotFound,
            "parent directory /x does not exist",
        ),
        (
            client.mkdir("/dir/file/z", false).await,
            ErrorCode::NotADirectory,
            "/dir/file is a file",
        ),
        (
            client.mkdir("relative", false).await,
            ErrorCode::InvalidPath,
            "must be absolute",
        ),
        (
            client.mkdir("/a/../b", false).await,
            ErrorCode::InvalidPath,
            "`..`",
        ),
        (
            client.mkdir("/a//b", false).await,
            ErrorCode::InvalidPath,
            "empty name",
        ),
        (
            client.mkdir("/a\0b", false).await,
            ErrorCode::InvalidPath,
            "NUL",
        ),
        (
            client.mkdir("", false).await,
            ErrorCode::InvalidPath,
            "empty path",
        ),
        (
            client.delete("/nope", false).await,
            ErrorCode::NotFound,
            "/nope: no such file or directory",
        ),
        (
            client.delete("/dir", false).await,
            ErrorCode::NotEmpty,
            "/dir: directory not empty",
        ),
        (
            client.delete("/", true).await,
            ErrorCode::InvalidArgument,
            "root",
        ),
        (
            client.rename("/nope", "/x", false).await,
            ErrorCode::NotFound,
            "/nope",
        ),
        (
            client.rename("/dir", "/dir/sub/inner", false).await,
            ErrorCode::InvalidArgument,
            "its own subdirectory",
        ),
        (
            client.rename("/dir/sub", "/dir/file", false).await,
            ErrorCode::AlreadyExists,
            "/dir/file already exists",
        ),
        (
            client.set_replication("/dir", 0).await,
            ErrorCode::InvalidArgument,
            "replication 0",
        ),
    ];
    for (result, code, text) in cases {
        let err = result.expect_err(text);
        assert_eq!(err.code(), Some(code), "{err}");
        assert!(
            err.to_string().contains(text),
            "{err} should mention {text:?}"
        );
    }
    let create_cases = [
        (
            "/dir/file",
            ErrorCode::AlreadyExists,
            "/dir/file: already exists",
        ),
        ("/dir", ErrorCode::IsADirectory, "/dir: is a directory"),
        (
            "/missing/f",
            ErrorCode::NotFound,
            "parent directory /missing does not exist",
        ),
        ("/dir/file/f", ErrorCode::NotADirectory, "is a file"),
    ];
    for (path, code, text) in create_cases {
        let err = client.create(path, opts(1)).await.err().expect(path);
        assert_eq!(err.code(), Some(code), "{err}");
        assert!(err.to_string().contains(text), "{err}");
    }
    let err = client.read_all("/dir").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::IsADirectory));
    let err = client.read_all("/none").await.unwrap_err();
    assert!(err.to_string().contains("/none: no such file or directory"));

    let after = client.fsck("/").await.unwrap();
    assert_eq!(before, after);
    assert_eq!(client.read_all("/dir/file").await.unwrap(), b"hello");
    let names: Vec<_> = client
        .list("/dir")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.path)
        .collect();
    assert_eq!(names, ["/dir/file", "/dir/sub"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_moves_subtrees_and_overwrite_replaces_atomically() {
    let c = TestCluster::start(Options {
        datanodes: 1,
        ..Default::default()
    })
    .await;
    let client = c.client();
    client.mkdir("/a/b", true).await.unwrap();
    put(&client, "/a/b/f", b"one", opts(1)).await;
    client.rename("/a", "/z", false).await.unwrap();
    assert_eq!(client.read_all("/z/b/f").await.unwrap(), b"one");
    assert!(client.try_stat("/a").await.unwrap().is_none());

    let mut o = opts(1);
    o.overwrite = true;
    let mut w = client.create("/z/b/f", o).await.unwrap();
    w.write(b"two!").await.unwrap();
    // The old content stays readable until the new file completes.
    assert_eq!(client.read_all("/z/b/f").await.unwrap(), b"one");
    w.close().await.unwrap();
    assert_eq!(client.read_all("/z/b/f").await.unwrap(), b"two!");
    wait_for(
        Duration::from_secs(10),
        "the replaced file's chunk to go",
        || async { c.chunk_files().len() == 1 },
    )
    .await;
    client.delete("/z", true).await.unwrap();
    assert!(client.list("/").await.unwrap().is_empty());
    wait_for(Duration::from_secs(10), "deleted chunks to go", || async {
        c.chunk_files().is_empty()
    })
    .await;
    let st = client.stat("/").await.unwrap();
    assert_eq!(st.kind, FileKind::Dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_holds_the_namenode_in_safe_mode_until_leaving_it() {
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    let alice = c.user_client("alice");
    assert_eq!(admin.safe_mode(SafeModeAction::Get).await.unwrap(), None);
    // Only the admin certificate changes it.
    let e = alice
        .safe_mode(SafeModeAction::Enter)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("only the admin"), "{e}");
    let why = admin
        .safe_mode(SafeModeAction::Enter)
        .await
        .unwrap()
        .expect("in safe mode");
    assert!(why.contains("quern safemode leave"), "{why}");
    // Reads work, changes are refused, whatever the reports say.
    assert!(admin.stat("/").await.is_ok());
    let e = admin.mkdir("/x", true).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SafeMode), "{e}");
    assert!(e.to_string().contains("entered by an operator"), "{e}");
    let e = alice.safe_mode(SafeModeAction::Leave).await.unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
    assert!(alice
        .safe_mode(SafeModeAction::Get)
        .await
        .unwrap()
        .is_some());
    assert_eq!(admin.safe_mode(SafeModeAction::Leave).await.unwrap(), None);
    admin.mkdir("/x", true).await.unwrap();
}
