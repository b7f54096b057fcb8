//! Large answers come in pages: directory listings, fsck, locate and the
//! datanodes' chunk reports, each page far under the frame limit.

use quern_client::Client;
use quern_proto::msg::*;
use quern_tests::*;
use std::time::Duration;

async fn put(client: &Client, path: &str, data: &[u8], replication: u8) {
    put_file(client, path, data, replication, 64 << 10).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_fsck_and_locate_come_in_pages() {
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    admin.mkdir("/d", false).await.unwrap();
    for i in 0..25 {
        put(&admin, &format!("/d/f{i:02}"), &[i as u8; 10], 1).await;
    }
    let big = random_bytes(5 * (64 << 10) - 7, 1);
    put(&admin, "/d/zbig", &big, 1).await;

    // Pages of ten, in name order, each saying whether more follow.
    let mut after = None;
    let mut names = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let page = admin
            .call(List {
                path: "/d".into(),
                start_after: after.clone(),
                limit: 10,
            })
            .await
            .unwrap();
        sizes.push(page.entries.len());
        names.extend(page.entries.iter().map(|e| e.path.clone()));
        after = page
            .entries
            .last()
            .map(|e| e.path.rsplit('/').next().unwrap().to_string());
        if !page.more {
            break;
        }
    }
    assert_eq!(sizes, vec![10, 10, 6]);
    let mut want: Vec<String> = (0..25).map(|i| format!("/d/f{i:02}")).collect();
    want.push("/d/zbig".into());
    assert_eq!(names, want);
    let all: Vec<String> = admin
        .list("/d")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(all, want);

    // fsck: counts over the whole tree on every page, files a page at a time.
    let first = admin
        .call(Fsck {
            path: "/".into(),
            start_after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(first.files.len(), 10);
    assert_eq!(first.chunks, 25 + 5);
    assert!(first.next.is_some());
    let report = admin.fsck("/").await.unwrap();
    assert_eq!(report.files.len(), 26);
    assert!(report.next.is_none());
    assert_eq!(report.health, Health::Healthy);

    // locate: chunk pages with the right offsets; the whole file reads back.
    let page = admin
        .call(Locate {
            path: "/d/zbig".into(),
            first_chunk: 2,
            limit: 2,
        })
        .await
        .unwrap();
    assert!(page.more);
    assert_eq!(
        page.chunks
            .iter()
            .map(|c| (c.index, c.offset))
            .collect::<Vec<_>>(),
        vec![(2, 2 * (64 << 10)), (3, 3 * (64 << 10))]
    );
    let loc = admin.locate("/d/zbig").await.unwrap();
    assert_eq!(loc.chunks.len(), 5);
    assert!(!loc.more);
    assert_eq!(admin.read_all("/d/zbig").await.unwrap(), big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_report_in_pages_is_reconciled_whole() {
    let mut c = TestCluster::start(Options {
        report_page: 3,
        ..Default::default()
    })
    .await;
    let admin = c.client();
    let data = random_bytes(10 * (64 << 10), 2);
    put(&admin, "/f", &data, 3).await;
    assert_eq!(admin.locate("/f").await.unwrap().chunks.len(), 10);
    // While it is down, datanode 0 loses two chunks; it comes back on a
    // new port and reports the other eight in pages of three.
    c.stop_datanode(0);
    let files = chunk_files_in(&c.datanode_dir(0));
    assert_eq!(files.len(), 10);
    for f in &files[..2] {
        std::fs::remove_file(f).unwrap();
        std::fs::remove_file(f.with_extension("meta")).unwrap();
    }
    c.start_datanode(0).await;
    let back = c.datanodes[0].as_ref().unwrap().id();
    wait_for(Duration::from_secs(15), "the paged report", || {
        let admin = admin.clone();
        async move {
            let Ok(loc) = admin.locate("/f").await else {
                return false;
            };
            let holding = loc
                .chunks
                .iter()
                .filter(|ch| ch.replicas.iter().any(|r| r.node.id == back))
                .count();
            let short = loc
                .chunks
                .iter()
                .filter(|ch| ch.replicas.len() == 2)
                .count();
            holding == 8 && short == 2
        }
    })
    .await;
    assert_eq!(admin.read_all("/f").await.unwrap(), data);
}
