//! Datasets and map tasks on in-process clusters: import, record-aligned
//! chunks, statistics by tasks on the datanodes, retries on bad replicas
//! and dead nodes, remote tasks.

use quern_client::{ImportOptions, JobOptions};
use quern_compute::import::{parse_csv, parse_idx, LabelColumn};
use quern_compute::ops::{self, Count, Operator, Partial, Task};
use quern_compute::records::Encoded;
use quern_proto::msg::{Health, RunTask};
use quern_proto::transport::{Endpoint, Tuning};
use quern_tests::*;
use std::time::Duration;

fn encoded_idx(n: usize, seed: u64) -> (Encoded, Vec<f32>, Vec<u32>) {
    let (images, labels, pixels, labs) = random_idx(n, 6, 5, 7, seed);
    let e = parse_idx("images", &images, "labels", &labels).expect("parse idx");
    let f = pixels.iter().map(|&p| f32::from(p)).collect();
    let l = labs.iter().map(|&l| u32::from(l)).collect();
    (e, f, l)
}

fn import_opts(chunk: u64, replication: u8) -> ImportOptions {
    ImportOptions {
        chunk_size: chunk,
        replication,
        ..ImportOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_by_map_tasks_equal_a_direct_computation() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let (data, features, labels) = encoded_idx(2000, 1);
    // 31-byte records, ~1 KiB chunks: 61 chunks spread over 3 nodes.
    let mut ds = client
        .import_dataset("/ds/small", &data, &import_opts(1024, 2))
        .await
        .expect("import");
    assert_eq!(ds.manifest.record_size, 31);
    assert_eq!(ds.manifest.chunk_size, 1023);
    let (stats, summary) = client
        .dataset_stats(&mut ds, &JobOptions::default())
        .await
        .expect("stats");
    assert_stats_eq(&stats, &direct_stats(&features, &labels, 30));
    let chunks = (2000 * 31u64).div_ceil(1023) as usize;
    assert_eq!(summary.tasks, chunks);
    assert_eq!(
        summary.node_local, chunks,
        "all nodes alive: every task node-local"
    );
    assert_eq!(summary.remote, 0);
    assert_eq!(summary.attempts, chunks);
    assert_eq!(summary.local_bytes_read, 2000 * 31);
    let cap = chunks.div_ceil(3) + 1;
    for (node, n) in &summary.per_node {
        assert!(*n <= cap, "{node} ran {n} tasks, more than {cap}");
    }
    // The statistics are now part of the manifest.
    let reopened = client.open_dataset("/ds/small").await.expect("open");
    assert_eq!(reopened.manifest.stats.as_ref(), Some(&stats));
    let back = client.read_records(&reopened).await.expect("read");
    assert_eq!(back, data.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_hold_whole_records_for_every_size() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut csv = String::from("a,b,c,label\n");
    for i in 0..300 {
        csv.push_str(&format!(
            "{},{},{},{}\n",
            i as f32 * 0.25,
            -(i as f32),
            i % 13,
            i % 4
        ));
    }
    let csv = parse_csv(
        "t.csv",
        csv.as_bytes(),
        &LabelColumn::Name("label".into()),
        true,
        false,
    )
    .unwrap();
    let (idx, _, _) = encoded_idx(333, 9);
    for (k, (data, chunk, part)) in [
        (&csv, 100u64, 1u64 << 30), // 16-byte records
        (&csv, 16, 1 << 30),        // one record per chunk
        (&csv, 1000, 2000),         // several parts
        (&idx, 4096, 1 << 30),      // 31-byte records
        (&idx, 30, 1 << 30),        // chunk smaller than a record: one record
        (&idx, 1 << 20, 1 << 30),   // one chunk
    ]
    .into_iter()
    .enumerate()
    {
        let dir = format!("/sizes/{k}");
        let opts = ImportOptions {
            part_size: part,
            ..import_opts(chunk, 1)
        };
        let ds = client
            .import_dataset(&dir, data, &opts)
            .await
            .expect("import");
        let rs = ds.manifest.record_size as u64;
        let mut records = 0;
        for p in ds.part_paths() {
            let loc = client.locate(&p).await.unwrap();
            assert_eq!(
                loc.status.chunk_size % rs,
                0,
                "{p}: chunk size splits records"
            );
            for ch in &loc.chunks {
                assert_eq!(
                    ch.meta.size % rs,
                    0,
                    "{p} chunk {} splits a record",
                    ch.index
                );
                records += ch.meta.size / rs;
            }
        }
        assert_eq!(records, data.records);
        if part == 2000 {
            assert!(ds.manifest.parts.len() > 1, "expected several parts");
        }
        let (count, summary) = client
            .run_map(
                &ds.part_paths(),
                &ds.manifest.layout,
                Operator::Count(Count),
                &JobOptions::default(),
            )
            .await
            .expect("count job");
        assert_eq!(count, Partial::Count(data.records), "case {k}");
        assert_eq!(summary.remote, 0);
        assert_eq!(
            client.read_records(&ds).await.unwrap(),
            data.bytes,
            "case {k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_replicas_are_skipped_and_reported() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let (data, features, labels) = encoded_idx(600, 3);
    let mut ds = client
        .import_dataset("/ds/c", &data, &import_opts(2048, 2))
        .await
        .unwrap();
    // One flipped byte in every chunk datanode 1 holds: whichever of them
    // the scheduler picks, the task must fail there and run elsewhere.
    assert!(damage_chunks_in(&c.datanode_dir(0), 0, 0x55) > 0);
    let (stats, summary) = client
        .dataset_stats(&mut ds, &JobOptions::default())
        .await
        .expect("stats despite corrupt replicas");
    assert_stats_eq(&stats, &direct_stats(&features, &labels, 30));
    assert!(!summary.retries.is_empty(), "expected retries: {summary:?}");
    assert!(
        summary.retries.iter().all(|r| r.error.contains("digest")),
        "{:?}",
        summary.retries
    );
    assert_eq!(summary.node_local, summary.tasks);
    // The datanode reported its bad replicas.
    wait_for(
        Duration::from_secs(10),
        "fsck to see the corrupt replicas",
        || {
            let client = client.clone();
            async move {
                client
                    .fsck("/ds/c")
                    .await
                    .is_ok_and(|r| r.health == Health::Corrupt)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_a_stopped_datanode_move_to_other_holders() {
    let mut c = TestCluster::start(Options::default()).await;
    let (data, features, labels) = encoded_idx(900, 5);
    let client = c.client();
    let mut ds = client
        .import_dataset("/ds/k", &data, &import_opts(2048, 3))
        .await
        .unwrap();
    // Stopped without a goodbye; the namenode still lists it as live (30 s
    // dead timeout), so the scheduler sends it tasks that must fail over.
    c.stop_datanode(2);
    let client =
        quern_client::Client::new(&c.admin_identity(), c.namenode_addr, Duration::from_secs(3))
            .unwrap();
    let (stats, summary) = client
        .dataset_stats(&mut ds, &JobOptions::default())
        .await
        .expect("stats with a datanode down");
    assert_stats_eq(&stats, &direct_stats(&features, &labels, 30));
    assert!(!summary.retries.is_empty(), "{summary:?}");
    assert_eq!(summary.node_local, summary.tasks);
    assert!(summary.attempts > summary.tasks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datanode_without_the_chunk_fetches_it_for_a_remote_task() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let (data, _, _) = encoded_idx(100, 8);
    let ds = client
        .import_dataset("/ds/r", &data, &import_opts(1 << 20, 1))
        .await
        .unwrap();
    let loc = client.locate(&ds.part_paths()[0]).await.unwrap();
    let chunk = &loc.chunks[0];
    let holder = chunk.replicas[0].node;
    let other = c
        .datanodes
        .iter()
        .flatten()
        .find(|d| d.id() != holder.id)
        .map(|d| quern_proto::msg::NodeAddr {
            id: d.id(),
            addr: d.addr(),
        })
        .unwrap();
    let ep = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    let task = ops::encode(&Task {
        layout: ds.manifest.layout.clone(),
        op: Operator::Count(Count),
    })
    .unwrap();
    let req = |sources| RunTask {
        chunk: chunk.meta,
        sources,
        token: Some(chunk.token.clone()),
        task: task.clone(),
    };
    let out = ep
        .call(other, req(vec![holder]))
        .await
        .expect("remote task");
    assert_eq!(out.local_bytes, 0);
    assert_eq!(out.fetched_bytes, chunk.meta.size);
    assert_eq!(
        ops::decode::<Partial>(&out.partial).unwrap(),
        Partial::Count(100)
    );
    // Without a source the node says what is missing.
    let err = ep.call(other, req(vec![])).await.unwrap_err().to_string();
    assert!(err.contains("holds no replica"), "{err}");
    // A task that is not a task is refused with a clear error.
    let mut bad = req(vec![]);
    bad.task = vec![0xff; 7];
    let err = ep.call(holder, bad).await.unwrap_err().to_string();
    assert!(err.contains("task"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_into_an_existing_path_changes_nothing() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let (data, _, _) = encoded_idx(10, 2);
    client
        .import_dataset("/d", &data, &import_opts(1024, 1))
        .await
        .unwrap();
    let before = client
        .read_records(&client.open_dataset("/d").await.unwrap())
        .await
        .unwrap();
    let (other, _, _) = encoded_idx(20, 4);
    let err = client
        .import_dataset("/d", &other, &import_opts(1024, 1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/d") && err.contains("exists"), "{err}");
    let after = client
        .read_records(&client.open_dataset("/d").await.unwrap())
        .await
        .unwrap();
    assert_eq!(before, after);
    let err = client.open_dataset("/nope").await.unwrap_err().to_string();
    assert!(
        err.contains("/nope") && err.contains("no such dataset"),
        "{err}"
    );
    client.mkdir("/plain", false).await.unwrap();
    let err = client.open_dataset("/plain").await.unwrap_err().to_string();
    assert!(err.contains("not a dataset"), "{err}");
}
