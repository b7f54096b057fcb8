//! Models and training through the real `quern` binary: model summary and
//! predict, a Fashion-MNIST slice trained and scored, a datanode SIGKILLed
//! mid-training, a coordinator SIGKILLed mid-training, and bad models and
//! flags.

use quern_compute::nn::npy;
use quern_tests::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn fails_with(r: &Run, wants: &[&str]) {
    assert_ne!(r.status, 0, "succeeded: {}", r.stdout);
    for w in wants {
        assert!(r.stderr.contains(w), "missing {w:?} in: {}", r.stderr);
    }
}

/// A client configuration with a short RPC timeout, so that calls to a
/// killed datanode give up quickly.
fn short_timeout_config(c: &BinCluster, dir: &Path) -> PathBuf {
    let base = std::fs::read_to_string(c.dir.path().join("client.toml")).unwrap();
    let p = dir.join("client-short.toml");
    std::fs::write(&p, format!("{base}rpc_timeout_secs = 3\n")).unwrap();
    p
}

#[test]
fn model_summary_and_predict_match_keras() {
    let r = run_quern(&["model", "summary", &fixture("seed_cnn.json")]);
    ok(&r);
    assert!(r.stdout.contains("1,663,370"), "{}", r.stdout);
    assert!(r.stdout.contains("(None, 14, 14, 64)"), "{}", r.stdout);
    let out = tempfile::tempdir().unwrap();
    let y = out.path().join("y.npy");
    ok(&run_quern(&[
        "model",
        "predict",
        "--model",
        &fixture("seed_cnn.json"),
        "--weights",
        &fixture("seed_cnn.weights.npz"),
        "--input",
        &fixture("seed_cnn.input.npy"),
        "--output",
        y.to_str().unwrap(),
    ]));
    let got = npy::load_npy(&y).unwrap();
    let want = npy::load_npy(Path::new(&fixture("seed_cnn.expected.npy"))).unwrap();
    assert_eq!(got.shape(), want.shape());
    let diff = got
        .iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff <= 1e-4, "max difference from Keras {diff}");

    let bad = out.path().join("bad.json");
    std::fs::write(&bad, "{\"class_name\": \"Sequential\", ").unwrap();
    fails_with(
        &run_quern(&["model", "summary", bad.to_str().unwrap()]),
        &["bad.json"],
    );
    let lstm = std::fs::read_to_string(fixture("mlp.json"))
        .unwrap()
        .replacen("\"Dense\"", "\"LSTM\"", 1);
    std::fs::write(&bad, lstm).unwrap();
    fails_with(
        &run_quern(&["model", "summary", bad.to_str().unwrap()]),
        &["LSTM"],
    );
    fails_with(
        &run_quern(&[
            "model",
            "predict",
            "--model",
            &fixture("mlp.json"),
            "--weights",
            &fixture("seed_cnn.weights.npz"),
            "--input",
            &fixture("mlp.input.npy"),
            "--output",
            y.to_str().unwrap(),
        ]),
        &["seed_cnn.weights.npz"],
    );
}

fn run_quern(args: &[&str]) -> Run {
    std::process::Command::new(quern_bin())
        .args(args)
        .output()
        .expect("run quern")
        .into()
}

#[test]
fn train_then_score_a_fashion_mnist_slice() {
    let Some((images, labels)) = fashion_test_files() else {
        return;
    };
    let c = BinCluster::up(3, &[]);
    ok(&c.import_idx(
        &images,
        &labels,
        "/fashion/slice",
        &["--chunk-size", "1MiB"],
    ));
    let local = tempfile::tempdir().unwrap();
    let svg = local.path().join("curves.svg");
    let train = c.quern(&[
        "train",
        "--model",
        &fixture("mlp.json"),
        "--data",
        "/fashion/slice",
        "--validation",
        "/fashion/slice",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--nesterov",
        "--scale",
        "1/255",
        "--display",
        "40",
        "--out",
        "/models/mlp",
        "--plot",
        svg.to_str().unwrap(),
        "--json",
    ]);
    ok(&train);
    assert!(
        train.stderr.contains("epoch 2:") && train.stderr.contains("val_acc"),
        "{}",
        train.stderr
    );
    // Three datanodes on one host: auto keeps the job on one of them.
    assert!(
        train
            .stderr
            .contains("plan: local (--plan auto): estimated"),
        "{}",
        train.stderr
    );
    // Of the distributed sets it weighed, two workers on the one host
    // send less around the ring than three, and compute as fast.
    assert!(
        train.stderr.contains("ms/step on 2 workers over 1 host")
            && train.stderr.contains("ms/step on 3 workers"),
        "{}",
        train.stderr
    );
    let summary: serde_json::Value = serde_json::from_str(&train.stdout).unwrap();
    assert_eq!(summary["iterations"], 400);
    assert_eq!(summary["dataset_bytes_over_network"], 0);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("accuracy"),
        "an SVG plot"
    );
    let ls = c.quern(&["ls", "/models/mlp"]);
    for f in [
        "model.keras",
        "model.json",
        "weights.npz",
        "log.jsonl",
        "train.json",
    ] {
        assert!(ls.stdout.contains(f), "{f} missing: {}", ls.stdout);
    }
    // Keras's pixel recipe needs no statistics: none were computed, and
    // scoring below divides as training did (raw 0..255 pixels would not
    // score above chance with these weights).
    let recipe = c.quern(&["cat", "/models/mlp/train.json"]);
    ok(&recipe);
    let recipe: serde_json::Value = serde_json::from_str(&recipe.stdout).unwrap();
    assert_eq!(recipe["scaler"]["kind"], "1/255", "{recipe}");
    let info = c.quern(&["dataset", "info", "/fashion/slice"]);
    assert!(info.stdout.contains("not computed"), "{}", info.stdout);
    let log = c.quern(&["cat", "/models/mlp/log.jsonl"]);
    assert!(
        log.stdout
            .lines()
            .filter(|l| l.contains("\"event\":\"step\""))
            .count()
            >= 10
    );

    let score = c.quern(&[
        "score",
        "--model",
        "/models/mlp",
        "--data",
        "/fashion/slice",
        "--json",
    ]);
    ok(&score);
    let s: serde_json::Value = serde_json::from_str(&score.stdout).unwrap();
    let acc = s["accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.6,
        "accuracy {acc} is not clearly better than chance (0.1)"
    );
    assert_eq!(s["count"], 10000);
    assert_eq!(s["confusion"].as_array().unwrap().len(), 10);
    assert_eq!(s["job"]["remote"], 0);
    let text = c.quern(&[
        "score",
        "--model",
        "/models/mlp",
        "--data",
        "/fashion/slice",
    ]);
    ok(&text);
    assert!(
        text.stdout.contains("accuracy") && text.stdout.contains("confusion"),
        "{}",
        text.stdout
    );

    // The weights load back where they came from: predict with them locally.
    let w = local.path().join("w.npz");
    ok(&c.quern(&["get", "/models/mlp/weights.npz", w.to_str().unwrap()]));
    ok(&run_quern(&[
        "model",
        "predict",
        "--model",
        &fixture("mlp.json"),
        "--weights",
        w.to_str().unwrap(),
        "--input",
        &fixture("mlp.input.npy"),
        "--output",
        local.path().join("p.npy").to_str().unwrap(),
    ]));

    // `quern model export` writes a .keras file that predicts the same; it
    // refuses to overwrite without --force.
    let keras = local.path().join("mlp.keras");
    ok(&c.quern(&["model", "export", "/models/mlp", keras.to_str().unwrap()]));
    let again = c.quern(&["model", "export", "/models/mlp", keras.to_str().unwrap()]);
    assert!(
        again.status != 0 && again.stderr.contains("--force"),
        "{}",
        again.stderr
    );
    ok(&run_quern(&[
        "model",
        "predict",
        "--model",
        keras.to_str().unwrap(),
        "--input",
        &fixture("mlp.input.npy"),
        "--output",
        local.path().join("p2.npy").to_str().unwrap(),
    ]));
    let p1 = std::fs::read(local.path().join("p.npy")).unwrap();
    let p2 = std::fs::read(local.path().join("p2.npy")).unwrap();
    assert_eq!(
        p1, p2,
        "the exported model predicts what its weights predict"
    );
    let bytes = std::fs::read(&keras).unwrap();
    let archive = quern_compute::nn::Model::from_keras_bytes(&bytes, "mlp.keras").unwrap();
    assert!(archive.has_h5_weights);
}

#[test]
fn training_survives_a_sigkilled_datanode() {
    let c = BinCluster::up(3, &["--dead-timeout", "60s"]);
    let local = tempfile::tempdir().unwrap();
    ok(&c.import_random(
        local.path(),
        "/rand",
        2000,
        28,
        28,
        10,
        4,
        &["--chunk-size", "64K", "-r", "2"],
    ));
    let cfg = short_timeout_config(&c, local.path());
    let mut child = c
        .command(&[
            "train",
            "--model",
            &fixture("mlp.json"),
            "--data",
            "/rand",
            "--epochs",
            "50",
            "--max-iter",
            "300",
            "--batch-size",
            "64",
            "--display",
            "1",
            "--plan",
            "distributed",
            "--out",
            "/models/k",
        ])
        .env("QUERN_CONFIG", &cfg)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let at10 = line.contains("iter     10 ");
        seen.push(line);
        if at10 {
            break;
        }
    }
    c.sigkill("datanode", 1);
    seen.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let all = seen.join("\n");
    assert!(status.success(), "{all}");
    assert!(all.contains("lost at iteration"), "{all}");
    assert!(all.contains("iter    300 "), "{all}");
    let log = c.quern(&["cat", "/models/k/log.jsonl"]);
    assert!(
        log.stdout.contains("\"event\":\"worker_lost\""),
        "{}",
        log.stdout
    );
}

/// Each datanode's (jobs, job_bytes) from `quern report --json`.
fn job_usage(c: &BinCluster) -> Vec<(u64, u64)> {
    let r = c.quern(&["report", "--json"]);
    let Ok(j) = serde_json::from_str::<serde_json::Value>(&r.stdout) else {
        return Vec::new();
    };
    j["datanodes"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|n| {
                    let field = |k: &str| n[k].as_u64().expect("jobs and job_bytes in --json");
                    (field("jobs"), field("job_bytes"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_sigkilled_coordinators_jobs_are_freed_within_two_leases() {
    let lease = Duration::from_secs(2);
    let heartbeat = Duration::from_millis(200);
    let c = BinCluster::up(3, &["--job-lease", "2s"]);
    let local = tempfile::tempdir().unwrap();
    ok(&c.import_random(
        local.path(),
        "/rand",
        2000,
        28,
        28,
        10,
        4,
        &["--chunk-size", "64K", "-r", "2"],
    ));
    // Far more iterations than the test waits for; nothing is read from
    // the child, so nothing can block it.
    let mut child = c
        .command(&[
            "train",
            "--model",
            &fixture("mlp.json"),
            "--data",
            "/rand",
            "--epochs",
            "1000",
            "--batch-size",
            "64",
            "--out",
            "/models/lease",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !job_usage(&c).iter().any(|&(j, b)| j > 0 && b > 0) {
        assert!(
            Instant::now() < deadline,
            "no datanode reported the job: {:?}",
            job_usage(&c)
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "quern train ended early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A live coordinator's job outlives two leases.
    std::thread::sleep(lease * 2);
    let usage = job_usage(&c);
    assert!(
        usage.iter().any(|&(j, _)| j > 0),
        "a running job was freed: {usage:?}"
    );
    let text = c.quern(&["report"]);
    assert!(text.stdout.contains("JOBS"), "{}", text.stdout);
    // Each datanode measured its sgemm rate when it started and reports it
    // with its heartbeats: the planner weighs the nodes by it.
    assert!(text.stdout.contains("GFLOP/S"), "{}", text.stdout);
    let r: serde_json::Value =
        serde_json::from_str(&c.quern(&["report", "--json"]).stdout).expect("report --json");
    for n in r["datanodes"].as_array().expect("datanodes") {
        let g = n["gflops"].as_f64().expect("gflops in --json");
        assert!(g > 1.0, "a datanode reports {g} GFLOP/s: {n}");
    }

    child.kill().unwrap(); // SIGKILL: nothing is closed
    child.wait().unwrap();
    let killed = Instant::now();
    let limit = lease * 2 + heartbeat;
    loop {
        let usage = job_usage(&c);
        if !usage.is_empty() && usage.iter().all(|&u| u == (0, 0)) {
            break;
        }
        assert!(
            killed.elapsed() <= limit,
            "jobs still held {:?} after the coordinator died: {usage:?}",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("freed within {:?} of the SIGKILL", killed.elapsed());
}

#[test]
fn bad_flags_and_models_are_refused_clearly() {
    let c = BinCluster::up(1, &[]);
    let local = tempfile::tempdir().unwrap();
    ok(&c.import_random(local.path(), "/d", 100, 28, 28, 10, 1, &["-r", "1"]));
    ok(&c.import_random(local.path(), "/small", 10, 8, 8, 3, 2, &["-r", "1"]));
    let mlp = fixture("mlp.json");
    let base = ["train", "--model", &mlp, "--out", "/m"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--data", "/nope"], vec!["/nope", "no such dataset"]),
        (vec!["--data", "/d", "--lr=-1"], vec!["--lr"]),
        (
            vec!["--data", "/d", "--batch-size", "0"],
            vec!["--batch-size"],
        ),
        (
            vec!["--data", "/d", "--nesterov"],
            vec!["--nesterov", "--momentum"],
        ),
        (
            vec!["--data", "/d", "--optimizer", "adam", "--momentum", "0.9"],
            vec!["adam"],
        ),
        (
            vec!["--data", "/d", "--scale", "max"],
            vec!["unknown scaling"],
        ),
        (
            vec!["--data", "/d", "--weights", "/no/w.npz"],
            vec!["/no/w.npz"],
        ),
        (vec!["--data", "/small"], vec!["784", "64"]),
        (
            vec!["--data", "/d", "--workers", "3"],
            vec![
                "--workers 3",
                "needs 2 live datanodes or more, and 1 is live",
            ],
        ),
    ];
    for (extra, wants) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(extra.iter());
        let r = c.quern(&args);
        fails_with(&r, &wants);
        assert!(
            c.quern(&["stat", "/m"]).status != 0,
            "{args:?} left a checkpoint"
        );
    }
    let twice = [
        "train",
        "--model",
        &mlp,
        "--data",
        "/d",
        "--out",
        "/m",
        "--max-iter",
        "2",
    ];
    ok(&c.quern(&twice));
    fails_with(&c.quern(&twice), &["/m", "--force"]);
    fails_with(
        &c.quern(&["score", "--model", "/d", "--data", "/d"]),
        &["/d", "checkpoint"],
    );
}

/// README's main job, shortened: the same command with a few iterations
/// of the fixture MLP instead of an epoch of the CNN.
#[test]
fn the_demo_runs_end_to_end() {
    if !Path::new("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists() {
        eprintln!("skipping: dataset-fashion-mnist is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster");
    let r = run_quern(&[
        "demo",
        "--max-iter",
        "30",
        "--model",
        &fixture("mlp.json"),
        "--dir",
        cluster.to_str().unwrap(),
    ]);
    ok(&r);
    for want in [
        "importing Fashion-MNIST",
        "training mlp",
        "scoring on the test set",
        "accuracy",
        "stopped",
    ] {
        assert!(
            r.stdout.contains(want) || r.stderr.contains(want),
            "missing {want:?}: {}{}",
            r.stdout,
            r.stderr
        );
    }
    assert!(r.stderr.contains("val_acc"), "{}", r.stderr);
    let status = run_quern(&["cluster", "status", "--dir", cluster.to_str().unwrap()]);
    assert_ne!(
        status.status, 0,
        "the demo stops its cluster: {}",
        status.stdout
    );
}

/// Float targets from CSV, a linear model trained with MSE, and a score
/// that reports the loss without accuracy or a confusion matrix.
#[test]
fn a_regression_from_csv_trains_and_scores_by_its_loss() {
    let c = BinCluster::up(2, &[]);
    let local = tempfile::tempdir().unwrap();
    let csv = local.path().join("houses.csv");
    let mut text = String::from("rooms,age,price\n");
    for i in 0..400u32 {
        let (rooms, age) = ((i % 7) as f64, ((i * 37) % 50) as f64 / 10.0);
        text.push_str(&format!(
            "{rooms},{age},{}\n",
            0.5 * rooms - 0.3 * age + 2.0
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let model = local.path().join("linear.json");
    std::fs::write(
        &model,
        serde_json::json!({"class_name": "Sequential", "config": {"name": "linear", "layers": [
            {"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [null, 2]}},
            {"class_name": "Dense", "config": {"name": "out", "units": 1}}
        ]}})
        .to_string(),
    )
    .unwrap();
    let import = c.quern(&[
        "dataset",
        "import",
        "csv",
        csv.to_str().unwrap(),
        "/houses",
        "--label-column",
        "price",
        "--header",
        "--regression",
        "--chunk-size",
        "1KiB",
    ]);
    ok(&import);
    assert!(import.stdout.contains("float targets"), "{}", import.stdout);
    let base = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        "/houses",
        "--epochs",
        "30",
        "--batch-size",
        "20",
    ];
    // Class cross-entropy on prices is refused before any step.
    fails_with(
        &c.quern(&[&base[..], &["--out", "/models/bad"]].concat()),
        &["float targets", "--loss mean_squared_error"],
    );
    ok(&c.quern(
        &[
            &base[..],
            &[
                "--loss",
                "mean_squared_error",
                "--optimizer",
                "adam",
                "--lr",
                "0.05",
                "--out",
                "/models/houses",
            ],
        ]
        .concat(),
    ));
    let score = c.quern(&["score", "--model", "/models/houses", "--data", "/houses"]);
    ok(&score);
    assert!(
        score.stdout.contains("MeanSquaredError") && !score.stdout.contains("accuracy"),
        "{}",
        score.stdout
    );
    let json = c.quern(&[
        "score",
        "--model",
        "/models/houses",
        "--data",
        "/houses",
        "--json",
    ]);
    ok(&json);
    let s: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert!(s["accuracy"].is_null());
    assert_eq!(s["count"], 400);
    let mse = s["loss"].as_f64().unwrap();
    assert!(mse < 0.01, "scored MSE {mse}");
}
