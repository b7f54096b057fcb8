//! `quern bench namenode` at a small scale: simulated datanodes register,
//! report, heartbeat and obey, all of them register again at once (a
//! report storm) without anyone declared dead, a lost one's replicas are
//! copied back at the set rate, and a SIGKILLed namenode becomes writable
//! again; the figures come out as
//! the JSON the scale document quotes.

use quern_tests::*;
use std::process::Command;

#[test]
fn the_namenode_benchmark_runs_every_phase_and_reports_its_figures() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(quern_bin())
        .args([
            "bench",
            "namenode",
            "--datanodes",
            "12",
            "--chunks",
            "20000",
            "--report-leases",
            "2",
            "--seconds",
            "2",
            "--heartbeat",
            "300ms",
            "--dead-timeout",
            "2s",
            "--replication-interval",
            "300ms",
            "--replication-per-node",
            "100",
            "--json",
            "--dir",
        ])
        .arg(d.path().join("nn"))
        .env_remove("QUERN_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in [
        "bytes_per_chunk",
        "heartbeat_p99_ms",
        "restart_to_writable_s",
        "stat_per_s",
        "create_per_s",
        "namenode_heartbeat_p99_ms_storm",
        "heartbeat_p99_ms_cold",
        "heartbeat_p99_ms_storm",
    ] {
        let v = f[key].as_f64().unwrap_or_else(|| panic!("{key} in {f}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    assert_eq!(f["chunks"], 20000);
    // Replication 3 over 12 nodes: each holds about a quarter of the
    // chunks (more than a registration carries, so every report waits for
    // one of the two report leases), and every one of the lost node's
    // replicas was copied back.
    let lost = f["lost_replicas"].as_u64().unwrap();
    assert!((4500..5500).contains(&lost), "{f}");
    assert_eq!(f["rereplicated"], lost, "{f}");
    // Every datanode registering again at once, under client load, costs
    // no node its liveness and no chunk its replicas.
    assert_eq!(f["storm_dead_datanodes"], 0, "{f}");
    assert_eq!(f["storm_missing_chunks"], 0, "{f}");
    assert_eq!(f["storm_under_replicated_chunks"], 0, "{f}");
    // The benchmark refuses to reuse a directory.
    let again = Command::new(quern_bin())
        .args(["bench", "namenode", "--dir"])
        .arg(d.path().join("nn"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("give a new directory"));
}
