//! Faults made inside one process by the transport's filters: stuck
//! replicas, stuck pipeline members, a partitioned namenode, late
//! heartbeats. No process is killed and no test waits on a real default
//! timeout.

use quern_client::Client;
use quern_proto::fault::{Direction, Fault, Rule};
use quern_proto::msg::NodeState;
use quern_tests::*;
use std::time::{Duration, Instant};

async fn put(client: &Client, path: &str, data: &[u8], replication: u8) {
    put_file(client, path, data, replication, 4 << 20).await
}

fn datanode(c: &TestCluster, id: quern_proto::NodeId) -> &quern_datanode::Datanode {
    c.datanodes
        .iter()
        .flatten()
        .find(|d| d.id() == id)
        .expect("datanode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stalls_mid_read_is_hedged_around() {
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    let data = random_bytes(8 << 20, 3);
    put(&admin, "/f", &data, 2).await;
    let loc = admin.locate("/f").await.unwrap();
    let first = loc.chunks[0].replicas[0].node;
    // The first replica sends 1 MiB of the chunk, then nothing, while its
    // connection stays up.
    datanode(&c, first.id).faults().add(Rule {
        direction: Direction::Incoming,
        peer: None,
        kind: Some("ReadChunk"),
        fault: Fault::Stall { after: 1 << 20 },
    });
    let reader = c.client();
    let t = Instant::now();
    let (bytes, source) = reader.read_chunk("/f", &loc.chunks[0]).await.unwrap();
    let took = t.elapsed();
    assert_eq!(&bytes[..], &data[..4 << 20]);
    assert_ne!(source.node.id, first.id, "served by another replica");
    assert_eq!(source.skipped, 1);
    // The hedge threshold (at most 1 s) plus one read of 4 MiB.
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The whole file too, whichever chunks the stuck node is first for.
    assert_eq!(reader.read_all("/f").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_member_that_stalls_mid_put_is_replaced() {
    let c = TestCluster::start(Options {
        datanodes: 4,
        piece_idle: Duration::from_millis(500),
        ..Default::default()
    })
    .await;
    let stuck = c.datanodes[1].as_ref().unwrap().id();
    // Every chunk arriving at this node stops flowing after 1 MiB.
    c.datanodes[1].as_ref().unwrap().faults().add(Rule {
        direction: Direction::Incoming,
        peer: None,
        kind: Some("WriteChunk"),
        fault: Fault::Stall { after: 1 << 20 },
    });
    let client = c.client_with(Duration::from_secs(20));
    let data = random_bytes(12 << 20, 4);
    put(&client, "/p", &data, 3).await;
    let loc = client.locate("/p").await.unwrap();
    assert_eq!(loc.chunks.len(), 3);
    for ch in &loc.chunks {
        let live: Vec<_> = ch
            .replicas
            .iter()
            .filter(|r| r.state == quern_proto::msg::ReplicaState::Live)
            .map(|r| r.node.id)
            .collect();
        assert_eq!(live.len(), 3, "chunk {}: {live:?}", ch.index);
        assert!(
            !live.contains(&stuck),
            "chunk {} on the stuck node",
            ch.index
        );
    }
    assert_eq!(client.read_all("/p").await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_namenode_fails_calls_in_bounded_time() {
    let c = TestCluster::start(Options {
        datanodes: 1,
        ..Default::default()
    })
    .await;
    let client = c.client_with(Duration::from_secs(2));
    client.stat("/").await.unwrap();
    for r in Rule::partition(c.namenode_addr) {
        client.faults().add(r);
    }
    let t = Instant::now();
    let e = client.stat("/").await.unwrap_err().to_string();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(
        e.contains(&format!("namenode {}", c.namenode_addr)) && e.contains("within 2 s"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
    client.faults().clear();
    client.stat("/").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_heartbeats_within_the_dead_timeout_declare_nobody_dead() {
    let c = TestCluster::start(Options {
        datanodes: 2,
        heartbeat: Duration::from_millis(200),
        dead_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let client = c.client();
    // Every heartbeat 1.2 s late: one every 1.4 s, inside the 2 s timeout.
    let rules: Vec<u64> = c
        .datanodes
        .iter()
        .flatten()
        .map(|d| {
            d.faults().add(Rule {
                direction: Direction::Outgoing,
                peer: None,
                kind: Some("Heartbeat"),
                fault: Fault::Delay(Duration::from_millis(1200)),
            })
        })
        .collect();
    all_stay_live(&c, 5, "heartbeats 1.2 s late").await;
    // The check can fail: heartbeats that stop make a node dead.
    let d0 = c.datanodes[0].as_ref().unwrap();
    d0.faults().remove(rules[0]);
    d0.faults().add(Rule {
        direction: Direction::Outgoing,
        peer: None,
        kind: Some("Heartbeat"),
        fault: Fault::Drop,
    });
    wait_for(
        Duration::from_secs(10),
        "the silent node to be dead",
        || {
            let client = client.clone();
            let id = d0.id();
            async move {
                client.report().await.is_ok_and(|r| {
                    r.datanodes
                        .iter()
                        .any(|d| d.node.id == id && d.state == NodeState::Dead)
                })
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_keeps_progressing_is_not_hedged() {
    let c = TestCluster::start(Options::default()).await;
    let admin = c.client();
    let data = random_bytes(64 << 20, 5);
    put_file(&admin, "/h", &data, 3, 64 << 20).await;
    let loc = admin.locate("/h").await.unwrap();
    // A threshold far shorter than the whole read: only silence, not a
    // long read, may start another replica.
    let tuning = quern_proto::transport::Tuning {
        hedge_after: Some(Duration::from_millis(50)),
        ..quern_proto::transport::Tuning::tuned()
    };
    let reader = Client::with_tuning(
        &c.admin_identity(),
        c.namenode_addr,
        Duration::from_secs(20),
        tuning,
    )
    .unwrap();
    // 64 MiB takes well over 50 ms here (over 1.3 GB/s would be needed).
    for _ in 0..3 {
        let t = Instant::now();
        let (bytes, source) = reader.read_chunk("/h", &loc.chunks[0]).await.unwrap();
        assert_eq!(bytes.len(), data.len());
        assert_eq!(
            source.skipped,
            0,
            "a healthy read of {:?} was hedged",
            t.elapsed()
        );
    }
}

/// All datanodes of `c` stay live for `secs` seconds (two dead timeouts
/// and more), checked every 200 ms.
async fn all_stay_live(c: &TestCluster, secs: u64, why: &str) {
    let client = c.client();
    let until = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < until {
        let r = client.report().await.unwrap();
        assert!(
            r.datanodes.iter().all(|d| d.state == NodeState::Live),
            "{why}: {:?}",
            r.datanodes
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_go_to_the_lifeline_port() {
    let c = TestCluster::start(Options {
        datanodes: 2,
        heartbeat: Duration::from_millis(200),
        dead_timeout: Duration::from_secs(2),
        ..Default::default()
    })
    .await;
    let nn = c.namenode.as_ref().unwrap();
    let drop_heartbeats = || Rule {
        direction: Direction::Incoming,
        peer: None,
        kind: Some("Heartbeat"),
        fault: Fault::Drop,
    };
    // The main port drops every heartbeat: the lifeline still carries them.
    nn.faults().add(drop_heartbeats());
    all_stay_live(&c, 5, "heartbeats dropped on the main port only").await;
    // The check can fail: with the lifeline dropping them too, nodes die.
    nn.lifeline_faults().add(drop_heartbeats());
    let client = c.client();
    wait_for(Duration::from_secs(20), "the datanodes to be dead", || {
        let client = client.clone();
        async move {
            client
                .report()
                .await
                .is_ok_and(|r| r.datanodes.iter().all(|d| d.state == NodeState::Dead))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifeline_port_out_of_reach_leaves_heartbeats_on_the_main_port() {
    // The lifeline listens where datanodes cannot reach it (they call the
    // namenode's address at the lifeline's port, where nothing answers):
    // as behind a firewall that lets only the main port through. They
    // give up on it at the connect timeout (5 s) and stay live.
    let c = TestCluster::start(Options {
        datanodes: 2,
        heartbeat: Duration::from_millis(200),
        dead_timeout: Duration::from_secs(8),
        lifeline: Some("127.0.0.2:0".parse().unwrap()),
        ..Default::default()
    })
    .await;
    all_stay_live(&c, 12, "lifeline out of reach").await;
    let r = c.client().report().await.unwrap();
    assert_eq!(r.datanodes.len(), 2);
}
