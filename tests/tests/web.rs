//! The namenode's web UI, the nodes' /metrics and the job history, over
//! real HTTP against in-process clusters.

use quern_client::{Client, ImportOptions, Plan, TrainOptions};
use quern_compute::import::parse_idx;
use quern_compute::nn::{Model, OptimizerConfig, Sgd};
use quern_compute::train::ScaleKind;
use quern_tests::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get(addr, &path, &[]))
        .await
        .unwrap()
}

fn model() -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keras/mlp.json");
    Model::from_keras_json(&std::fs::read_to_string(path).unwrap()).expect("fixture model")
}

/// The value of a sample line `name{labels} value` (labels exactly as
/// written), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_shows_the_clusters_real_figures() {
    let mut c = TestCluster::start(Options {
        dead_timeout: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let client = c.client();
    client.mkdir("/data/set one", true).await.unwrap();
    let data = random_bytes(3 << 20, 4);
    put_file(&client, "/data/set one/part<0>", &data, 2, 1 << 20).await;
    let web = c.namenode_http();

    let (status, page) = get(web, "/").await;
    assert_eq!(status, 200, "{page}");
    let report = client.report().await.unwrap();
    assert!(page.contains(&report.cluster_id), "{page}");
    assert!(
        page.contains("<div class=\"v live\">3</div><div class=\"k\">live datanodes</div>"),
        "{page}"
    );
    assert!(
        page.contains("<div class=\"v\">3</div><div class=\"k\">chunks</div>"),
        "{page}"
    );

    // Each node's measured speed, once its heartbeats carry it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let report = loop {
        let r = client.report().await.unwrap();
        if r.datanodes.iter().all(|d| d.gflops > 0.0) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no speed reported: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (status, page) = get(web, "/datanodes").await;
    assert_eq!(status, 200);
    assert!(page.contains("sgemm GFLOP/s"), "{page}");
    for d in &report.datanodes {
        assert!(
            page.contains(&format!("<td class=\"n\">{:.0}</td></tr>", d.gflops)),
            "{} GFLOP/s for {} missing: {page}",
            d.gflops,
            d.node.addr
        );
        assert!(
            page.contains(&format!(
                "data-addr=\"{}\" data-state=\"live\"",
                d.node.addr
            )),
            "{page}"
        );
    }

    // The browser lists the directory, escapes the odd name, and shows
    // each chunk with the datanodes that hold it.
    let (status, page) = get(web, "/browse?path=/data/set%20one").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("part&lt;0&gt;"), "{page}");
    assert!(!page.contains("part<0>"), "names are escaped: {page}");
    assert!(
        page.contains(&format!("data-bytes=\"{}\"", data.len())),
        "{page}"
    );
    let (status, page) = get(web, "/browse?path=/data/set%20one/part%3C0%3E").await;
    assert_eq!(status, 200, "{page}");
    let loc = client.locate("/data/set one/part<0>").await.unwrap();
    assert_eq!(loc.chunks.len(), 3);
    for chunk in &loc.chunks {
        assert!(page.contains(&chunk.meta.id.to_string()), "{page}");
        for r in &chunk.replicas {
            assert!(
                page.contains(&format!("data-addr=\"{}\"", r.node.addr)),
                "{page}"
            );
        }
    }
    let (status, page) = get(web, "/browse?path=/no/such").await;
    assert_eq!(status, 404);
    assert!(page.contains("/no/such"), "{page}");

    let (status, page) = get(web, "/jobs").await;
    assert_eq!(status, 200);
    assert!(page.contains("No job yet"), "{page}");

    // A datanode stopped shows as dead once the dead timeout passes.
    let gone = c.datanodes[2].as_ref().unwrap().addr();
    c.stop_datanode(2);
    wait_for(
        Duration::from_secs(15),
        "the datanode to show as dead",
        || async {
            let (_, page) = get(web, "/datanodes").await;
            page.contains(&format!("data-addr=\"{gone}\" data-state=\"dead\""))
        },
    )
    .await;
    let (_, page) = get(web, "/").await;
    assert!(
        page.contains("<div class=\"v dead\">1</div><div class=\"k\">dead datanodes</div>"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_what_happens() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let before: Vec<String> = (0..3)
        .map(|i| http_get(c.datanode_http(i), "/metrics", &[]).1)
        .collect();
    let data = random_bytes(2 << 20, 5);
    put_file(&client, "/m", &data, 3, 1 << 20).await;
    assert_eq!(client.read_all("/m").await.unwrap(), data);
    let after: Vec<String> = (0..3)
        .map(|i| http_get(c.datanode_http(i), "/metrics", &[]).1)
        .collect();
    let total =
        |texts: &[String], series: &str| -> f64 { texts.iter().map(|t| sample(t, series)).sum() };
    // Replication 3: every datanode stored every byte once.
    assert_eq!(
        total(&after, "quern_datanode_written_bytes_total")
            - total(&before, "quern_datanode_written_bytes_total"),
        3.0 * data.len() as f64
    );
    assert!(
        total(&after, "quern_datanode_read_bytes_total")
            - total(&before, "quern_datanode_read_bytes_total")
            >= data.len() as f64
    );
    assert_eq!(total(&after, "quern_datanode_chunks"), 6.0);
    assert!(
        total(&after, "quern_requests_total{kind=\"WriteChunk\"}") >= 2.0,
        "{}",
        after[0]
    );
    let (status, nn) = get(c.namenode_http(), "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(sample(&nn, "quern_datanodes{state=\"live\"}"), 3.0, "{nn}");
    assert_eq!(sample(&nn, "quern_chunks"), 2.0, "{nn}");
    assert!(sample(&nn, "quern_requests_total{kind=\"CommitChunk\"}") >= 2.0);
    assert!(
        sample(&nn, "quern_heartbeat_age_seconds{") == 0.0,
        "labels are written"
    );
    assert!(nn.contains("quern_heartbeat_age_seconds{addr=\""), "{nn}");
    for text in [&nn, &after[0]] {
        promtool_check(text);
    }
}

/// Runs `promtool check metrics` (Debian's prometheus package) on a scrape.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            panic!("promtool is needed to check the metrics ({e}): apt-get install prometheus")
        }
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scrape:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_beyond_loopback_need_the_token() {
    let Some(ip) = outside_ip() else {
        panic!("this machine has no IPv4 address besides loopback to test from");
    };
    let token = "a-long-operator-token-0123456789";
    let c = TestCluster::start(Options {
        datanodes: 1,
        http_ip: std::net::Ipv4Addr::UNSPECIFIED.into(),
        http_token: Some(token.into()),
        ..Options::default()
    })
    .await;
    let port = c.namenode_http().port();
    let outside = SocketAddr::new(ip.into(), port);
    let local = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
    let (status, body) = http_get(outside, "/", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    let (status, _) = http_get(outside, "/metrics", &["Authorization: Bearer wrong-token"]);
    assert_eq!(status, 401);
    let (status, body) = http_get(outside, "/", &[&format!("Authorization: Bearer {token}")]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("live datanodes"));
    let (status, _) = http_get(outside, &format!("/jobs?token={token}"), &[]);
    assert_eq!(status, 200);
    let (status, _) = http_get(local, "/datanodes", &[]);
    assert_eq!(status, 200, "loopback callers need no token");
    let dn = SocketAddr::new(ip.into(), c.datanode_http(0).port());
    assert_eq!(http_get(dn, "/metrics", &[]).0, 401);
    let (status, body) = http_get(dn, "/metrics", &[&format!("Authorization: Bearer {token}")]);
    assert_eq!(status, 200);
    assert!(body.contains("quern_datanode_chunks"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_job_is_in_the_history_with_its_curve() {
    let c = TestCluster::start(Options::default()).await;
    let client: Client = c.client();
    let (images, labels, _, _) = random_idx(300, 28, 28, 10, 8);
    let data = parse_idx("images", &images, "labels", &labels).unwrap();
    let opts = ImportOptions {
        chunk_size: 785 * 50,
        replication: 2,
        ..ImportOptions::default()
    };
    let mut ds = client.import_dataset("/train", &data, &opts).await.unwrap();
    let val = client.import_dataset("/val", &data, &opts).await.unwrap();
    let m = model();
    let train = TrainOptions {
        objective: Default::default(),
        shuffle: true,
        plan: Plan::Distributed,
        workers: None,
        model_json: m.keras_json().to_string(),
        init: m.init_params(3).into_vec(),
        optimizer: OptimizerConfig::from(Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
        }),
        epochs: 2,
        batch: 30,
        max_iter: None,
        seed: 3,
        scale: ScaleKind::Minmax,
        display: 2,
        sync: 1,
    };
    let run = client
        .train(&mut ds, Some(&val), &train, |_| {})
        .await
        .unwrap();
    let (status, body) = get(c.namenode_http(), "/api/jobs").await;
    assert_eq!(status, 200, "{body}");
    let jobs: serde_json::Value = serde_json::from_str(&body).unwrap();
    let jobs = jobs.as_array().unwrap();
    // The statistics for the scaler ran first, as their own job.
    let mut kinds: Vec<&str> = jobs.iter().map(|j| j["kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(kinds, ["statistics", "train"]);
    let train_job = jobs.iter().find(|j| j["kind"] == "train").unwrap();
    let id = train_job["id"].as_u64().unwrap();
    let (status, body) = get(c.namenode_http(), &format!("/api/jobs/{id}")).await;
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["state"], "finished", "{j}");
    assert_eq!(j["user"], "admin");
    assert_eq!(j["dataset"], "/train");
    assert_eq!(j["plan"], "distributed");
    assert_eq!(j["iterations"], run.summary.iterations);
    assert_eq!(j["workers"].as_array().unwrap().len(), 3);
    let points = j["points"].as_array().unwrap();
    // 20 steps shown every 2, and each epoch's validation.
    let steps: Vec<_> = points.iter().filter(|p| p["val_loss"].is_null()).collect();
    let vals: Vec<_> = points.iter().filter(|p| !p["val_loss"].is_null()).collect();
    assert_eq!(steps.len() as u64, run.summary.iterations / 2);
    assert_eq!(vals.len(), 2);
    let last_loss = run
        .events
        .iter()
        .rev()
        .find_map(|e| match e {
            quern_client::TrainEvent::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .unwrap();
    assert_eq!(steps.last().unwrap()["loss"].as_f64().unwrap(), last_loss);
    assert_eq!(
        steps.last().unwrap()["worker_step_ms"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(steps.last().unwrap()["bytes_moved"].as_u64().unwrap() > 0);
    assert!(j["result"].as_str().unwrap().contains("iterations"));
    let (status, page) = get(c.namenode_http(), &format!("/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("<svg id=\"loss\""), "{page}");
    let (_, page) = get(c.namenode_http(), "/jobs").await;
    assert!(
        page.contains(&format!("data-job=\"{id}\" data-state=\"finished\"")),
        "{page}"
    );

    // Only the job's own coordinator posts to it.
    let bob = c.user_client("bob");
    let e = bob
        .call(quern_proto::msg::JobPost {
            job: id,
            note: quern_proto::msg::JobNote::Failed {
                error: "not mine".into(),
            },
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("only its coordinator"), "{e}");
}
