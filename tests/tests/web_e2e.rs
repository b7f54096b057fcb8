//! The web UI of a cluster of real `quern` processes: the URLs `cluster up`
//! prints and records, the job history across a SIGKILLed namenode, and a
//! real browser (headless Chromium) watching a training curve grow.

use quern_tests::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn http_of(v: &serde_json::Value) -> SocketAddr {
    v["http"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP address in {v}"))
}

fn jobs(web: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http_get(web, "/api/jobs", &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap()
}

fn train_args<'a>(out: &'a str, max_iter: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        "/rand",
        "--epochs",
        "1000",
        "--max-iter",
        max_iter,
        "--batch-size",
        "32",
        "--display",
        "2",
        "--plan",
        "distributed",
        "--out",
        out,
    ]
}

#[test]
fn cluster_up_serves_the_ui_and_the_job_history_survives_a_killed_namenode() {
    let c = BinCluster::up(2, &[]);
    let j = c.cluster_json();
    let web = http_of(&j["namenode"]);
    let datanodes: Vec<SocketAddr> = j["datanodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(http_of)
        .collect();
    assert_eq!(datanodes.len(), 2);
    let status = Command::new(quern_bin())
        .args(["cluster", "status", "--dir"])
        .arg(c.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("web UI: http://{web}/")), "{text}");
    for d in &datanodes {
        let (code, body) = http_get(*d, "/metrics", &[]);
        assert_eq!(code, 200);
        assert!(
            body.contains("quern_datanode_heartbeat_age_seconds"),
            "{body}"
        );
    }

    let local = tempfile::tempdir().unwrap();
    ok(&c.import_random(
        local.path(),
        "/rand",
        400,
        28,
        28,
        10,
        2,
        &["--chunk-size", "64K"],
    ));
    let model = fixture("mlp.json");
    let mut args = train_args("/models/a", "10");
    args.extend(["--model", &model]);
    ok(&c.quern(&args));
    let before = jobs(web);
    let train = before
        .iter()
        .find(|j| j["kind"] == "train")
        .unwrap_or_else(|| panic!("no training job in {before:?}"))
        .clone();
    assert_eq!(train["state"], "finished", "{train}");
    assert_eq!(train["last"]["iteration"], 10, "{train}");

    c.sigkill("namenode", 0);
    ok(&c.restart());
    assert_eq!(
        http_of(&c.cluster_json()["namenode"]),
        web,
        "a restarted namenode serves the UI at the same address"
    );
    let after = jobs(web);
    assert_eq!(after.len(), before.len(), "{after:?}");
    let again = after.iter().find(|j| j["id"] == train["id"]).unwrap();
    assert_eq!(again["state"], "finished");
    assert_eq!(again["last"], train["last"]);
    let (code, page) = http_get(web, &format!("/jobs/{}", train["id"]), &[]);
    assert_eq!(code, 200);
    assert!(page.contains("finished"), "{page}");
}

/// A Python with selenium, for the browser test (`.ci/run` makes one).
fn browser_python() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("QUERN_KERAS_PYTHON")?);
    let has = Command::new(&python)
        .args(["-c", "import selenium"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        has,
        "{} has no selenium: pip install selenium (and apt-get install chromium \
         chromium-driver)",
        python.display()
    );
    Some(python)
}

#[test]
fn a_browser_sees_a_running_jobs_curve_grow() {
    let Some(python) = browser_python() else {
        eprintln!(
            "the browser test is skipped: set QUERN_KERAS_PYTHON to a Python with selenium \
             (.ci/run does)"
        );
        return;
    };
    let c = BinCluster::up(2, &[]);
    let web = http_of(&c.cluster_json()["namenode"]);
    let local = tempfile::tempdir().unwrap();
    ok(&c.import_random(
        local.path(),
        "/rand",
        2000,
        28,
        28,
        10,
        3,
        &["--chunk-size", "256K"],
    ));
    let model = fixture("mlp.json");
    let mut args = train_args("/models/b", "100000");
    args.extend(["--model", &model]);
    let mut child = c
        .command(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The job is running and has a few points before the browser opens.
    let mut id = None;
    for _ in 0..300 {
        id = jobs(web)
            .iter()
            .find(|j| {
                j["kind"] == "train"
                    && j["state"] == "running"
                    && j["last"]["iteration"].as_u64().unwrap_or(0) >= 4
            })
            .map(|j| j["id"].clone());
        if id.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = id.expect("the training job shows as running within 30 s");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("job-page.png");
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/watch_job.py"))
        .arg(format!("http://{web}/jobs/{id}"))
        .arg(&shot)
        .arg("4")
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (before, after) = (
        seen["before"].as_u64().unwrap(),
        seen["after"].as_u64().unwrap(),
    );
    assert!(before >= 2, "{seen}");
    assert!(after > before, "the curve grew without a reload: {seen}");
    assert_eq!(seen["state"], "running");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot was saved"
    );
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn bench_io_can_run_under_a_metrics_scraper() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(quern_bin())
        .args([
            "bench", "io", "--size", "64MiB", "--files", "50", "--scrape", "200ms", "--dir",
        ])
        .arg(d.path().join("c"))
        .env_remove("QUERN_CONFIG")
        .output()
        .unwrap();
    let r: Run = out.into();
    ok(&r);
    assert!(
        r.stdout
            .contains("scraping /metrics of 4 nodes every 0.2 s"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("put R=3:"), "{}", r.stdout);
    assert!(!r.stderr.contains("scraping failed"), "{}", r.stderr);
    let scrapes: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_suffix(" scrapes of /metrics answered during the run"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no scrape count in {}", r.stdout));
    assert!(scrapes >= 4, "{}", r.stdout);
}

#[test]
fn a_namenode_refuses_to_serve_http_beyond_loopback_without_a_token() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().display().to_string();
    let init = Command::new(quern_bin())
        .args(["cluster", "init", "--dir", &dir])
        .output()
        .unwrap();
    ok(&init.into());
    let nn = d.path().join("namenode").display().to_string();
    let start = |extra: &[&str]| -> Run {
        let mut args = vec!["namenode", "--dir", &nn, "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Command::new(quern_bin())
            .args(&args)
            .output()
            .unwrap()
            .into()
    };
    let r = start(&["--http", "0.0.0.0:0"]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("without authentication") && r.stderr.contains("--http-token-file"),
        "{}",
        r.stderr
    );
    let short = d.path().join("short.token");
    std::fs::write(&short, "abc\n").unwrap();
    let r = start(&[
        "--http",
        "0.0.0.0:0",
        "--http-token-file",
        short.to_str().unwrap(),
    ]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("use at least 16"), "{}", r.stderr);
    let r = start(&["--http", "0.0.0.0:0", "--http-token-file", "/no/such/token"]);
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("/no/such/token"), "{}", r.stderr);
}
