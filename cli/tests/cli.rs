//! The binary's own surface: help, version, argument errors. (Its presence
//! also makes `cargo test` build the `quern` binary the e2e tests run.)

use std::process::Command;

fn quern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_quern"))
        .args(args)
        .env_remove("QUERN_CONFIG")
        .output()
        .expect("run quern")
}

#[test]
fn help_lists_every_verb() {
    let out = quern(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for verb in [
        "namenode", "datanode", "cluster", "bench", "put", "get", "cat", "ls", "mkdir", "rm", "mv",
        "stat", "du", "setrep", "locate", "fsck", "report",
    ] {
        assert!(text.contains(verb), "--help lacks {verb}:\n{text}");
    }
}

#[test]
fn bad_arguments_are_refused_by_name() {
    let out = quern(&["put", "/a"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("<REMOTE>"));
    let out = quern(&["namenode", "--dir", "/tmp/x", "--dead-timeout", "soon"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration \"soon\""));
}

#[test]
fn cluster_status_without_a_cluster_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = quern(&["cluster", "status", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no cluster.json"), "{err}");
    assert!(err.contains("quern cluster up"), "{err}");
}
