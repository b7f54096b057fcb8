//! A datanode whose disk fills up: the write fails cleanly, the writer
//! moves on, the node says it is full and takes nothing until space
//! returns. The disk is a small tmpfs (tests run as root, as in CI).

use quern_client::Client;
use quern_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs at {} (needs root)", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn put(client: &Client, path: &str, data: &[u8]) {
    put_file(client, path, data, 1, 4 << 20).await
}

async fn full(client: &Client, node: quern_proto::NodeId) -> bool {
    client
        .report()
        .await
        .unwrap()
        .datanodes
        .iter()
        .any(|d| d.node.id == node && d.full)
}

async fn chunks_on(client: &Client, path: &str, node: quern_proto::NodeId) -> usize {
    client
        .locate(path)
        .await
        .unwrap()
        .chunks
        .iter()
        .filter(|c| c.replicas.iter().any(|r| r.node.id == node))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_cleanly_and_takes_nothing_until_space_returns() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    }
    // Heartbeats 2 s apart: the namenode's view of free space lags, as it
    // does on any busy cluster.
    let mut c = TestCluster::start(Options {
        datanodes: 2,
        heartbeat: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let client = c.client();
    put(&client, "/before", &random_bytes(8 << 20, 6)).await;
    let disk = Tmpfs::mount(&c.datanode_dir(2), "24m");
    c.add_datanode().await;
    c.wait_live(3).await;
    let small = c.datanodes[2].as_ref().unwrap().id();
    // Filled behind the namenode's back: it still counts 24 MiB free there,
    // and the empty node is the first choice for the next chunk, which no
    // longer fits. Everything is made ready first, so the write follows the
    // filler at once: a heartbeat in between (every 2 s) would tell the
    // namenode the truth, and the node would never be chosen.
    let data = random_bytes(32 << 20, 7);
    let filler = vec![1u8; 21 << 20];
    std::fs::write(disk.0.join("filler"), filler).unwrap();
    put(&client, "/a", &data).await;
    assert_eq!(client.read_all("/a").await.unwrap(), data);
    wait_for(
        Duration::from_secs(10),
        "the node to say it is full",
        || full(&client, small),
    )
    .await;
    // The write that hit the full disk left nothing behind.
    let tmp: Vec<_> = std::fs::read_dir(disk.0.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    assert!(chunk_files_in(&disk.0).is_empty());
    assert_eq!(chunks_on(&client, "/a", small).await, 0);

    // Full: nothing new goes there.
    put(&client, "/b", &random_bytes(16 << 20, 8)).await;
    assert_eq!(chunks_on(&client, "/b", small).await, 0);

    // Space returns: the node clears itself and takes chunks again.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    wait_for(
        Duration::from_secs(15),
        "the node to take chunks again",
        || {
            let client = client.clone();
            async move { !full(&client, small).await }
        },
    )
    .await;
    // One more heartbeat brings the namenode's free-space figure up.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    put(&client, "/c", &random_bytes(8 << 20, 9)).await;
    assert!(chunks_on(&client, "/c", small).await > 0);
    drop(c);
    drop(disk);
}
