//! Distributed training on in-process clusters: the same losses as the
//! one-process algorithm, bit-identical reruns, and a datanode lost
//! mid-training.

use quern_client::{Client, Dataset, ImportOptions, Plan, TrainEvent, TrainOptions};
use quern_compute::import::parse_idx;
use quern_compute::nn::{Model, OptimizerConfig, Sgd};
use quern_compute::train::{train_local, ScaleKind, Scaler, Worker, WorkerSpec};
use quern_proto::fault::{Direction, Fault, Rule};
use quern_proto::msg::*;
use quern_proto::transport::{Endpoint, Tuning};
use quern_proto::ErrorCode;
use quern_tests::*;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The fixture MLP made small (16 and 8 hidden units) with a dropout
/// layer, so that masks are part of what must agree.
fn tiny_model() -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keras/mlp.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let layers = j["config"]["layers"].as_array_mut().unwrap();
    layers[2]["config"]["units"] = 16.into();
    layers[3]["config"]["units"] = 8.into();
    let mut dropout = layers[3].clone();
    dropout["class_name"] = "Dropout".into();
    dropout["config"] =
        serde_json::json!({"name": "drop", "rate": 0.25, "trainable": true, "dtype": "float32"});
    layers.insert(3, dropout);
    Model::from_keras_json(&j.to_string()).expect("tiny model")
}

async fn dataset(client: &Client, n: usize, seed: u64) -> Dataset {
    let (images, labels, _, _) = random_idx(n, 28, 28, 10, seed);
    let data = parse_idx("images", &images, "labels", &labels).unwrap();
    let opts = ImportOptions {
        chunk_size: 785 * 40,
        replication: 2,
        ..ImportOptions::default()
    };
    client.import_dataset("/train", &data, &opts).await.unwrap()
}

fn options(model: &Model, seed: u64) -> TrainOptions {
    TrainOptions {
        objective: Default::default(),
        shuffle: true,
        plan: Plan::Distributed,
        workers: None,
        model_json: model.keras_json().to_string(),
        init: model.init_params(seed).into_vec(),
        optimizer: OptimizerConfig::from(Sgd {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
        }),
        epochs: 3,
        batch: 32,
        max_iter: Some(20),
        seed,
        scale: ScaleKind::Minmax,
        display: 1,
        sync: 1,
    }
}

/// The workers' chunks, from the job's Started event.
fn started_shards(events: &[TrainEvent]) -> Vec<Vec<usize>> {
    events
        .iter()
        .find_map(|e| match e {
            TrainEvent::Started { shards, .. } => Some(shards.clone()),
            _ => None,
        })
        .expect("a Started event")
}

fn losses(events: &[TrainEvent]) -> Vec<f64> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect()
}

/// A small residual network with BatchNormalization: conv, BN, relu, a
/// second conv added back to the first block, global pooling, softmax.
fn tiny_bn_model() -> Model {
    let t = |from: &str| {
        serde_json::json!({"class_name": "__keras_tensor__",
            "config": {"keras_history": [from, 0, 0]}})
    };
    let layer = |class: &str, name: &str, config: serde_json::Value, from: &[&str]| {
        let mut config = config;
        config["name"] = name.into();
        let args: Vec<_> = from.iter().map(|f| t(f)).collect();
        let args = if args.len() == 1 {
            serde_json::json!(args)
        } else {
            serde_json::json!([args])
        };
        serde_json::json!({"class_name": class, "name": name, "config": config,
            "inbound_nodes": [{"args": args, "kwargs": {}}]})
    };
    let j = serde_json::json!({"class_name": "Functional", "config": {"name": "tiny_bn",
        "layers": [
            {"class_name": "InputLayer", "name": "in", "config": {"name": "in", "batch_shape": [null, 28, 28, 1]}, "inbound_nodes": []},
            layer("Conv2D", "c1", serde_json::json!({"filters": 4, "kernel_size": 3, "strides": 2, "padding": "same", "use_bias": false}), &["in"]),
            layer("BatchNormalization", "bn", serde_json::json!({"momentum": 0.9}), &["c1"]),
            layer("Activation", "r1", serde_json::json!({"activation": "relu"}), &["bn"]),
            layer("Conv2D", "c2", serde_json::json!({"filters": 4, "kernel_size": 3, "padding": "same"}), &["r1"]),
            layer("Add", "add", serde_json::json!({}), &["r1", "c2"]),
            layer("GlobalAveragePooling2D", "gap", serde_json::json!({}), &["add"]),
            layer("Dense", "out", serde_json::json!({"units": 10, "activation": "softmax"}), &["gap"]),
        ],
        "input_layers": [["in", 0, 0]], "output_layers": [["out", 0, 0]]}});
    Model::from_keras_json(&j.to_string()).expect("tiny BN model")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_training_follows_the_one_process_algorithm() {
    follows_the_one_process_algorithm(tiny_model(), Options::default(), None).await;
}

/// A gradient large enough to go round the ring in several buckets, each
/// sent while the backward pass computes the layers before it, still
/// equals the one-process replay bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gradient_summed_in_buckets_during_backward_equals_the_replay() {
    follows_the_one_process_algorithm(bucketed_mlp(), Options::default(), None).await;
}

/// A datanode that takes ring pieces only through its connections (shared
/// memory refused: another user, a container) sits in a ring whose other
/// link still goes through memory; the sums are the same, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_partly_through_shared_memory_equals_the_replay() {
    let opts = Options {
        ring_memory_off: vec![1],
        ..Options::default()
    };
    follows_the_one_process_algorithm(bucketed_mlp(), opts, None).await;
}

/// The shared memory a worker writes its ring pieces into counts against
/// its datanode's job memory budget: the same job charges the datanodes
/// together what every worker sends in a step, 2 (n - 1) gradients, more
/// than when their rings go through the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_ring_memory_is_charged_to_the_job() {
    let model = bucketed_mlp();
    let through_memory = charged_mid_job(&model, Vec::new()).await;
    let through_streams = charged_mid_job(&model, vec![0, 1, 2]).await;
    let grad = 4 * model.param_count() as u64;
    let extra = through_memory.saturating_sub(through_streams);
    let want = 2 * (3 - 1) * grad;
    assert!(
        extra.abs_diff(want) < want / 50,
        "{through_memory} bytes charged with shared memory, {through_streams} without: \
         {extra} more, not the {want} of the regions"
    );
}

/// The job bytes all datanodes report while a 3-worker job is past its
/// fifth step.
async fn charged_mid_job(model: &Model, ring_memory_off: Vec<usize>) -> u64 {
    let c = TestCluster::start(Options {
        ring_memory_off,
        ..Options::default()
    })
    .await;
    let client = c.client();
    let ds = dataset(&client, 600, 9).await;
    let opts = TrainOptions {
        max_iter: Some(10_000),
        epochs: 10_000,
        ..options(model, 3)
    };
    let job = train_past_step_5(&client, ds, opts).await;
    // Until two reports a few heartbeats apart give the same three charges.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = Vec::new();
    let total = loop {
        let usage = job_usage(&client).await;
        if usage.len() == 3 && usage.iter().all(|&(j, b)| j == 1 && b > 0) && usage == last {
            break usage.iter().map(|&(_, b)| b).sum();
        }
        assert!(
            Instant::now() < deadline,
            "job charges never settled: {usage:?}"
        );
        last = usage;
        tokio::time::sleep(Duration::from_millis(700)).await;
    };
    job.abort();
    total
}

/// The MLP fixture widened so its gradient spans several ring buckets.
fn bucketed_mlp() -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/keras/mlp.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let layers = j["config"]["layers"].as_array_mut().unwrap();
    layers[2]["config"]["units"] = 64.into();
    layers[3]["config"]["units"] = 4096.into();
    let model = Model::from_keras_json(&j.to_string()).unwrap();
    let ranges: Vec<_> = model
        .param_specs()
        .iter()
        .map(|s| s.offset..s.offset + s.len)
        .collect();
    let buckets = quern_compute::ring::buckets(&ranges, quern_compute::ring::BUCKET_VALUES);
    assert!(buckets.len() >= 2, "{buckets:?}");
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_normalization_trains_as_its_one_process_replay() {
    let model = tiny_bn_model();
    let params = follows_the_one_process_algorithm(model.clone(), Options::default(), None).await;
    // The moving statistics moved with the global batch's statistics.
    let mm = model
        .param_specs()
        .iter()
        .find(|s| s.name == "bn/moving_mean")
        .unwrap();
    assert!(
        params[mm.offset..mm.offset + mm.len]
            .iter()
            .any(|v| *v != 0.0),
        "moving mean updated"
    );
}

/// Trains `model` on an in-process cluster and replays the run in one
/// process; returns the final weights.
/// `--workers 2` on three datanodes: two of them share every chunk (any
/// two hold a replica of each, at replication 2), sum around a ring of two,
/// and the result is still the replay's with the same shards, bit for bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_datanodes_train_as_their_replay() {
    follows_the_one_process_algorithm(tiny_model(), Options::default(), Some(2)).await;
}

/// Every datanode measures its sgemm rate as it starts and reports it with
/// its heartbeats; the planner's reason says it weighed the nodes by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datanodes_report_the_speed_the_planner_weighs() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let nodes = client.report().await.unwrap().datanodes;
        if nodes.len() == 3 && nodes.iter().all(|d| d.gflops > 1.0) {
            break;
        }
        let speeds: Vec<f64> = nodes.iter().map(|d| d.gflops).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "datanodes did not report their speed: {speeds:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut ds = dataset(&client, 200, 3).await;
    let model = tiny_model();
    let opts = TrainOptions {
        plan: Plan::Auto,
        ..options(&model, 7)
    };
    let run = client.train(&mut ds, None, &opts, |_| {}).await.unwrap();
    let TrainEvent::Planned(d) = &run.events[0] else {
        panic!("first event is Planned: {:?}", run.events[0]);
    };
    assert!(
        d.reason.contains("from the nodes' measured sgemm"),
        "{}",
        d.reason
    );
}

/// A number of workers the cluster cannot give, or with the one-worker
/// plan, is refused before any datanode loads a record, naming the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impossible_number_of_workers_is_refused_clearly() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = dataset(&client, 200, 3).await;
    let model = tiny_model();
    for (plan, n, want) in [
        (
            Plan::Distributed,
            5,
            "--workers 5: a distributed plan takes 2 to 3 workers",
        ),
        (
            Plan::Distributed,
            1,
            "--workers 1: a distributed plan takes 2 to 3 workers",
        ),
        (Plan::Local, 2, "--workers 2 with --plan local"),
    ] {
        let opts = TrainOptions {
            plan,
            workers: Some(n),
            ..options(&model, 7)
        };
        let Err(e) = client.train(&mut ds, None, &opts, |_| {}).await else {
            panic!("{plan} with --workers {n} was not refused");
        };
        let e = e.to_string();
        assert!(e.contains(want), "{want:?} missing: {e}");
    }
    assert!(no_jobs_left(&client).await, "nothing opened");
}

async fn follows_the_one_process_algorithm(
    model: Model,
    cluster: Options,
    workers: Option<usize>,
) -> Vec<f32> {
    let memory_off = cluster.ring_memory_off.len();
    let c = TestCluster::start(cluster).await;
    let client = c.client();
    let mut ds = dataset(&client, 500, 3).await;
    let opts = TrainOptions {
        workers,
        ..options(&model, 7)
    };
    let run = client
        .train(&mut ds, None, &opts, |_| {})
        .await
        .expect("train");
    let dist = losses(&run.events);
    assert_eq!(dist.len(), 20);
    assert_eq!(run.summary.dataset_bytes_over_network, 0, "data stays put");
    let shards = started_shards(&run.events);
    assert!(shards.len() >= 2, "work spread over datanodes: {shards:?}");
    let TrainEvent::Planned(d) = &run.events[0] else {
        panic!("first event is Planned: {:?}", run.events[0]);
    };
    assert_eq!(d.workers, shards.len(), "{d:?}");
    if let Some(n) = workers {
        assert_eq!(shards.len(), n, "the workers asked for: {shards:?}");
        let mut all: Vec<usize> = shards.concat();
        all.sort_unstable();
        assert_eq!(
            all,
            (0..13).collect::<Vec<_>>(),
            "each of the 13 chunks once"
        );
    }
    // The gradients went round the ring, each of its 2 (n - 1) segments
    // per worker once, and the parameters stayed on the workers: after the
    // seed, the coordinator's links carry less than one copy per worker
    // (the star sent every worker the parameters and took its gradient).
    let (n, grad) = (shards.len() as u64, 4 * model.param_count() as u64);
    assert_eq!(run.summary.ring_bytes, 20 * 2 * (n - 1) * grad);
    // The datanodes share this host: every link between two that take
    // shared memory carries its pieces through it, the others through the
    // connection.
    let (ring, shared) = (run.summary.ring_bytes, run.summary.ring_shared_bytes);
    if memory_off == 0 {
        assert_eq!(shared, ring, "every piece through shared memory");
    } else {
        assert!(
            shared > 0 && shared < ring / 2,
            "{shared} of {ring} ring bytes through shared memory"
        );
    }
    let coordinator = (run.summary.step_bytes - run.summary.ring_bytes) / 20;
    assert!(
        coordinator < grad * n,
        "{coordinator} bytes a step between coordinator and workers, gradient {grad}"
    );

    // Replay in one process with the same shards, the same chunk order.
    let mut chunks = Vec::new();
    for p in ds.part_paths() {
        let loc = client.locate(&p).await.unwrap();
        for ch in &loc.chunks {
            chunks.push(client.read_chunk(&p, ch).await.unwrap().0);
        }
    }
    let scaler = Scaler::fit(ScaleKind::Minmax, ds.manifest.stats.as_ref().unwrap());
    assert_eq!(scaler, run.scaler);
    let mut workers: Vec<Worker> = shards
        .iter()
        .map(|idx| {
            let mut w = Worker::new(WorkerSpec {
                model_json: opts.model_json.clone(),
                layout: ds.manifest.layout.clone(),
                scaler: scaler.clone(),
                seed: opts.seed,
                objective: Default::default(),
                shuffle: true,
            })
            .unwrap();
            for &i in idx {
                w.add_chunk(&chunks[i]).unwrap();
            }
            w
        })
        .collect();
    let mut params = model.params_from_flat(opts.init.clone()).unwrap();
    let mut local = Vec::new();
    train_local(
        &mut workers,
        &mut params,
        opts.optimizer,
        opts.batch,
        opts.epochs,
        opts.max_iter,
        |_, s| local.push(s.loss),
    )
    .unwrap();
    assert_eq!(local.len(), 20);
    for (i, (d, l)) in dist.iter().zip(&local).enumerate() {
        assert!(
            (d - l).abs() <= 1e-5,
            "step {i}: distributed {d} vs one process {l}"
        );
    }
    let differ = params
        .as_slice()
        .iter()
        .zip(&run.params)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(params.len(), run.params.len());
    assert_eq!(
        differ, 0,
        "final weights differ from the replay's in {differ} places"
    );
    run.params
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_gives_the_same_weights() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = dataset(&client, 300, 5).await;
    let model = tiny_model();
    let opts = options(&model, 11);
    let a = client.train(&mut ds, None, &opts, |_| {}).await.unwrap();
    let b = client.train(&mut ds, None, &opts, |_| {}).await.unwrap();
    assert_eq!(a.params, b.params, "bit-identical weights");
    let other = TrainOptions { seed: 12, ..opts };
    let c2 = client.train(&mut ds, None, &other, |_| {}).await.unwrap();
    assert_ne!(a.params, c2.params, "another seed, another model");
}

/// Starts training in the background, slowed to 20 ms a step so a test
/// can act mid-job, and returns once step 5 is done.
async fn train_past_step_5(
    client: &Client,
    mut ds: Dataset,
    opts: TrainOptions,
) -> tokio::task::JoinHandle<quern_client::Result<quern_client::TrainOutcome>> {
    let (tx, rx) = mpsc::channel();
    let job = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .train(&mut ds, None, &opts, move |e| {
                    if let TrainEvent::Step { iteration: 5, .. } = e {
                        let _ = tx.send(());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                })
                .await
        }
    });
    tokio::task::spawn_blocking(move || rx.recv())
        .await
        .unwrap()
        .unwrap();
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_datanode_hands_its_share_to_other_holders() {
    loses_a_datanode_mid_training(tiny_model()).await;
}

/// Workers waiting for a lost one's BatchNormalization sums are stopped,
/// and the step runs again without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datanode_lost_mid_exchange_does_not_stall_the_others() {
    loses_a_datanode_mid_training(tiny_bn_model()).await;
}

async fn loses_a_datanode_mid_training(model: Model) {
    let mut c = TestCluster::start(Options::default()).await;
    let client = Client::new(
        &c.admin_identity(),
        c.namenode_addr,
        std::time::Duration::from_secs(3),
    )
    .unwrap();
    let ds = dataset(&client, 600, 9).await;
    let opts = TrainOptions {
        max_iter: Some(40),
        ..options(&model, 3)
    };
    let job = train_past_step_5(&client, ds, opts).await;
    c.stop_datanode(1);
    let run = job
        .await
        .unwrap()
        .expect("training finishes without the datanode");
    assert_eq!(losses(&run.events).len(), 40);
    let lost: Vec<_> = run
        .events
        .iter()
        .filter(|e| matches!(e, TrainEvent::WorkerLost { .. }))
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(run.summary.workers_lost, 1);
    assert_eq!(
        run.summary.dataset_bytes_over_network, 0,
        "moved to holders, not fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_steps_then_model_averaging() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = dataset(&client, 400, 6).await;
    let model = tiny_model();
    let exact = client
        .train(&mut ds, None, &options(&model, 4), |_| {})
        .await
        .unwrap();
    let k5 = TrainOptions {
        sync: 5,
        ..options(&model, 4)
    };
    let a = client.train(&mut ds, None, &k5, |_| {}).await.unwrap();
    let b = client.train(&mut ds, None, &k5, |_| {}).await.unwrap();
    assert_eq!(a.summary.iterations, 20);
    assert_eq!(a.params, b.params, "--sync K is deterministic too");
    assert_ne!(
        a.params, exact.params,
        "model averaging is not minibatch SGD"
    );
    assert!(a.params.iter().all(|p| p.is_finite()));
    // Four rounds of five local steps, each sending every worker the
    // parameters and taking its own back (2n copies), against exact SGD's
    // ring moving 2 (n - 1) gradients every step.
    assert!(
        a.summary.step_bytes * 2 < exact.summary.step_bytes,
        "{} vs {}",
        a.summary.step_bytes,
        exact.summary.step_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_replica_is_fetched_from_another_holder() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = dataset(&client, 400, 8).await;
    let model = tiny_model();
    let clean = client
        .train(&mut ds, None, &options(&model, 5), |_| {})
        .await
        .unwrap();
    // A flipped byte in every chunk one datanode holds.
    assert!(damage_chunks_in(&c.datanode_dir(0), 7, 0x20) > 0);
    let run = client
        .train(&mut ds, None, &options(&model, 5), |_| {})
        .await
        .unwrap();
    assert_eq!(run.summary.workers_lost, 0, "the worker keeps its share");
    assert!(
        run.summary.dataset_bytes_over_network > 0,
        "the bad chunks came from other holders"
    );
    assert_eq!(run.params, clean.params, "same data, same model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datanode_partitioned_during_training_hands_its_share_over() {
    partitions_a_datanode_mid_training(tiny_model()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datanode_partitioned_mid_exchange_hands_its_share_over() {
    partitions_a_datanode_mid_training(tiny_bn_model()).await;
}

async fn partitions_a_datanode_mid_training(model: Model) {
    let c = TestCluster::start(Options::default()).await;
    // A step that gets no answer within the RPC timeout loses its worker.
    // Healthy workers must always answer within it, even while the rest of
    // the suite loads the two cores: one second proved too tight for that.
    let client = Client::new(
        &c.admin_identity(),
        c.namenode_addr,
        std::time::Duration::from_secs(3),
    )
    .unwrap();
    let ds = dataset(&client, 600, 9).await;
    let opts = TrainOptions {
        max_iter: Some(30),
        ..options(&model, 3)
    };
    let job = train_past_step_5(&client, ds, opts).await;
    // Cut off, not stopped: it runs on, but nothing reaches it or leaves it.
    let cut = c.datanodes[1].as_ref().unwrap();
    for direction in [Direction::Incoming, Direction::Outgoing] {
        cut.faults().add(Rule {
            direction,
            peer: None,
            kind: None,
            fault: Fault::Drop,
        });
    }
    let run = job
        .await
        .unwrap()
        .expect("training finishes without the partitioned datanode");
    assert_eq!(losses(&run.events).len(), 30);
    assert_eq!(run.summary.workers_lost, 1);
}

/// Jobs and job bytes per datanode, from the namenode's report.
async fn job_usage(client: &Client) -> Vec<(u64, u64)> {
    match client.report().await {
        Ok(r) => r.datanodes.iter().map(|d| (d.jobs, d.job_bytes)).collect(),
        Err(_) => Vec::new(),
    }
}

async fn no_jobs_left(client: &Client) -> bool {
    let usage = job_usage(client).await;
    !usage.is_empty() && usage.iter().all(|&u| u == (0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_job_is_freed_within_two_leases() {
    let lease = Duration::from_secs(1);
    let c = TestCluster::start(Options {
        job_lease: lease,
        ..Options::default()
    })
    .await;
    let client = c.client();
    let mut ds = dataset(&client, 600, 13).await;
    let model = tiny_model();
    let opts = TrainOptions {
        epochs: 10_000,
        max_iter: None,
        ..options(&model, 2)
    };
    let (tx, rx) = mpsc::channel();
    let job = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .train(&mut ds, None, &opts, move |e| {
                    if let TrainEvent::Step { iteration: 3, .. } = e {
                        let _ = tx.send(());
                    }
                })
                .await
        }
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("training reaches iteration 3");
    wait_for(Duration::from_secs(5), "the job in the report", || {
        let client = client.clone();
        async move {
            job_usage(&client)
                .await
                .iter()
                .any(|&(j, b)| j > 0 && b > 0)
        }
    })
    .await;
    // Training mid-way, with the workers' records loaded: abandon it.
    job.abort();
    assert!(job.await.is_err_and(|e| e.is_cancelled()));
    let abandoned = Instant::now();
    wait_for(lease * 2, "every datanode to free the job", || {
        let client = client.clone();
        async move { no_jobs_left(&client).await }
    })
    .await;
    // Sooner than any lease: dropping the training future closed them.
    let took = abandoned.elapsed();
    assert!(took < lease, "freed {took:?} after the abandon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_coordinators_job_expires_and_a_renewed_one_does_not() {
    let lease = Duration::from_secs(1);
    let c = TestCluster::start(Options {
        datanodes: 1,
        job_lease: lease,
        ..Options::default()
    })
    .await;
    let client = c.client();
    let ds = {
        let (images, labels, _, _) = random_idx(100, 28, 28, 10, 21);
        let data = parse_idx("images", &images, "labels", &labels).unwrap();
        let opts = ImportOptions {
            chunk_size: 785 * 40,
            replication: 1,
            ..ImportOptions::default()
        };
        client.import_dataset("/lease", &data, &opts).await.unwrap()
    };
    let loc = client.locate(&ds.part_paths()[0]).await.unwrap();
    let chunk = &loc.chunks[0];
    let node = chunk.replicas[0].node;
    let spec = quern_compute::ops::encode(&WorkerSpec {
        objective: Default::default(),
        model_json: tiny_model().keras_json().to_string(),
        layout: ds.manifest.layout.clone(),
        scaler: Scaler::none(),
        seed: 1,
        shuffle: true,
    })
    .unwrap();
    // A coordinator of its own, which opens two jobs, renews one and
    // then says nothing more, as if it had died.
    let coordinator = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    for job in [1, 2] {
        let opened = coordinator
            .call(
                node,
                TrainOpen {
                    job,
                    spec: spec.clone(),
                    chunks: vec![chunk.meta],
                    sources: vec![vec![]],
                    tokens: vec![Some(chunk.token.clone())],
                },
            )
            .await
            .unwrap();
        assert_eq!(opened.records, 40);
        assert_eq!(opened.lease_ms, 1000);
    }
    wait_for(Duration::from_secs(5), "two jobs in the report", || {
        let client = client.clone();
        async move { job_usage(&client).await.first().is_some_and(|u| u.0 == 2) }
    })
    .await;
    // Three leases of renewing job 2 only.
    let started = Instant::now();
    while started.elapsed() < lease * 3 {
        tokio::time::sleep(lease / 3).await;
        let r = coordinator
            .call(node, TrainRenew { jobs: vec![2] })
            .await
            .unwrap();
        assert!(r.unknown.is_empty(), "the renewed job is held");
    }
    let r = coordinator
        .call(node, TrainRenew { jobs: vec![1, 2] })
        .await
        .unwrap();
    assert_eq!(r.unknown, vec![1], "the silent job expired");
    // Now nothing renews job 2: gone within two leases.
    let silent = Instant::now();
    wait_for(lease * 2, "the last job to expire", || {
        let client = client.clone();
        async move { no_jobs_left(&client).await }
    })
    .await;
    eprintln!("expired {:?} after the last renewal", silent.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_busy_for_longer_than_the_lease_keeps_its_workers() {
    let c = TestCluster::start(Options {
        job_lease: Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    let client = c.client();
    let mut ds = dataset(&client, 300, 17).await;
    let model = tiny_model();
    let opts = TrainOptions {
        max_iter: Some(6),
        ..options(&model, 9)
    };
    let run = client
        .train(&mut ds, None, &opts, |e| {
            // Between steps the coordinator does something else for
            // three leases (as a validation pass would).
            if let TrainEvent::Step { iteration: 2, .. } = e {
                std::thread::sleep(Duration::from_millis(1500));
            }
        })
        .await
        .expect("train");
    assert_eq!(run.summary.iterations, 6);
    assert_eq!(run.summary.workers_lost, 0, "{:?}", run.events);
    wait_for(
        Duration::from_secs(5),
        "the finished job to be closed",
        || {
            let client = client.clone();
            async move { no_jobs_left(&client).await }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_the_memory_budget_is_refused_clearly() {
    let c = TestCluster::start(Options {
        job_memory: Some(64 << 10),
        ..Options::default()
    })
    .await;
    let client = c.client();
    let mut ds = dataset(&client, 400, 19).await;
    let model = tiny_model();
    let e = match client
        .train(&mut ds, None, &options(&model, 1), |_| {})
        .await
    {
        Ok(_) => panic!("a job over every node's budget trained"),
        Err(e) => e.to_string(),
    };
    // Each chunk decodes to 40 * (784 + 2) * 4 bytes: more than a 64 KiB
    // budget, so every holder refuses its share.
    for want in [
        "does not fit in memory",
        "65536 bytes",
        "--job-memory",
        "datanode",
    ] {
        assert!(e.contains(want), "{want:?} missing: {e}");
    }
    assert!(
        no_jobs_left(&client).await,
        "{:?}",
        job_usage(&client).await
    );

    // The refusal is the datanode's, with NoSpace, straight from TrainOpen.
    let loc = client.locate(&ds.part_paths()[0]).await.unwrap();
    let chunk = &loc.chunks[0];
    let spec = quern_compute::ops::encode(&WorkerSpec {
        objective: Default::default(),
        model_json: model.keras_json().to_string(),
        layout: ds.manifest.layout.clone(),
        scaler: Scaler::none(),
        seed: 1,
        shuffle: true,
    })
    .unwrap();
    let ep = Endpoint::client(&c.admin_identity(), Tuning::tuned()).unwrap();
    let e = ep
        .call(
            chunk.replicas[0].node,
            TrainOpen {
                job: 7,
                spec,
                chunks: vec![chunk.meta],
                sources: vec![vec![]],
                tokens: vec![Some(chunk.token.clone())],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}");
    let e = e.to_string();
    let node = chunk.replicas[0].node.addr.to_string();
    for want in [&node, "125760 bytes", "65536 bytes", "--job-memory"] {
        assert!(e.contains(want), "{want:?} missing: {e}");
    }
}

#[test]
fn a_workers_memory_is_what_its_datanode_charges() {
    let model = tiny_model();
    let (images, labels, _, _) = random_idx(100, 28, 28, 10, 4);
    let data = parse_idx("images", &images, "labels", &labels).unwrap();
    let layout = data.layout.clone();
    let mut w = Worker::new(WorkerSpec {
        objective: Default::default(),
        model_json: model.keras_json().to_string(),
        layout: layout.clone(),
        scaler: Scaler::none(),
        seed: 1,
        shuffle: true,
    })
    .unwrap();
    let charged = Worker::decoded_bytes(&layout, data.bytes.len() as u64);
    assert_eq!(charged, 100 * (784 + 2) * 4);
    w.reserve(100);
    let half = data.bytes.len() / 2;
    w.add_chunk(&data.bytes[..half]).unwrap();
    w.add_chunk(&data.bytes[half..]).unwrap();
    // Features and labels, in what was reserved; the shuffle order comes
    // with the first step.
    assert_eq!(w.memory_bytes(), charged - 100 * 4);
}

/// A convolutional autoencoder (Conv2D down, Conv2DTranspose up, sigmoid
/// output) trained with MSE against its own input.
fn tiny_autoencoder() -> Model {
    let j = serde_json::json!({"class_name": "Sequential", "config": {"name": "ae", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [null, 28, 28, 1]}},
        {"class_name": "Conv2D", "config": {"name": "enc", "filters": 4, "kernel_size": 3,
            "strides": 2, "padding": "same", "activation": "relu"}},
        {"class_name": "Conv2DTranspose", "config": {"name": "dec", "filters": 1, "kernel_size": 3,
            "strides": 2, "padding": "same", "activation": "sigmoid"}}
    ]}});
    Model::from_keras_json(&j.to_string()).expect("autoencoder")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoencoder_learns_its_input_with_mse() {
    use quern_compute::nn::Loss;
    use quern_compute::train::{Objective, TargetKind};
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = dataset(&client, 400, 21).await;
    let model = tiny_autoencoder();
    let objective = Objective {
        loss: Loss::MeanSquaredError,
        target: TargetKind::Input,
    };
    let opts = TrainOptions {
        objective,
        optimizer: quern_compute::nn::Adam {
            lr: 0.01,
            ..Default::default()
        }
        .into(),
        max_iter: Some(36),
        ..options(&model, 5)
    };
    let run = client.train(&mut ds, None, &opts, |_| {}).await.unwrap();
    let l = losses(&run.events);
    assert_eq!(l.len(), 36);
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[31..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.8 * first, "MSE went from {first} to {last}");

    // Scoring reports the reconstruction loss; accuracy has no meaning.
    let (s, _) = client
        .score(&ds, &opts.model_json, &run.params, &run.scaler, objective)
        .await
        .unwrap();
    assert_eq!(s.count, 400);
    assert!(s.confusion.is_empty());
    assert!(
        s.loss() > 0.0 && s.loss() < first,
        "scored MSE {}",
        s.loss()
    );

    // A model whose output is not the input's shape is refused up front.
    let bad = TrainOptions {
        model_json: tiny_model().keras_json().to_string(),
        init: tiny_model().init_params(1).into_vec(),
        ..opts.clone()
    };
    let Err(err) = client.train(&mut ds, None, &bad, |_| {}).await else {
        panic!("a classifier cannot be trained to reproduce its input");
    };
    assert!(err.to_string().contains("--target input"), "{err}");
}

/// A regression dataset: three features in [0, 10), target
/// 0.3 x0 - 0.2 x1 + 0.1 x2 + 1 plus a little noise, from CSV with
/// --regression (float32 targets).
async fn regression_dataset(client: &Client, n: usize) -> Dataset {
    use quern_compute::import::{parse_csv, LabelColumn};
    let mut rng = quern_compute::nn::SplitMix64::new(31);
    let mut u = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut text = String::from("a,b,c,y\n");
    for _ in 0..n {
        let (a, b, c) = (10.0 * u(), 10.0 * u(), 10.0 * u());
        let y = 0.3 * a - 0.2 * b + 0.1 * c + 1.0 + 0.05 * (u() - 0.5);
        text.push_str(&format!("{a},{b},{c},{y}\n"));
    }
    let data = parse_csv("r.csv", text.as_bytes(), &LabelColumn::Index(3), true, true).unwrap();
    let opts = ImportOptions {
        chunk_size: 16 * 50,
        replication: 2,
        ..ImportOptions::default()
    };
    client.import_dataset("/reg", &data, &opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_model_learns_float_targets() {
    use quern_compute::nn::Loss;
    use quern_compute::train::Objective;
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = regression_dataset(&client, 600).await;
    let j = serde_json::json!({"class_name": "Sequential", "config": {"name": "linear", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [null, 3]}},
        {"class_name": "Dense", "config": {"name": "out", "units": 1}}
    ]}});
    let model = Model::from_keras_json(&j.to_string()).unwrap();
    let objective = Objective {
        loss: Loss::MeanSquaredError,
        target: Default::default(),
    };
    let opts = TrainOptions {
        objective,
        optimizer: quern_compute::nn::Adam {
            lr: 0.05,
            ..Default::default()
        }
        .into(),
        epochs: 20,
        max_iter: None,
        ..options(&model, 3)
    };
    let run = client.train(&mut ds, None, &opts, |_| {}).await.unwrap();
    let shards = started_shards(&run.events);
    assert!(shards.len() >= 2, "work spread over datanodes: {shards:?}");
    // The targets spread with variance ~1.2; a fitted line leaves the
    // noise (~2e-4) plus what 20 epochs did not finish.
    let (s, _) = client
        .score(&ds, &opts.model_json, &run.params, &run.scaler, objective)
        .await
        .unwrap();
    assert_eq!(s.count, 600);
    assert!(s.confusion.is_empty(), "no classes to confuse");
    assert!(s.loss() < 0.01, "scored MSE {}", s.loss());

    // Cross-entropy on float targets is refused, naming what to use.
    let bad = TrainOptions {
        objective: Objective::default(),
        ..opts.clone()
    };
    let Err(err) = client.train(&mut ds, None, &bad, |_| {}).await else {
        panic!("classes cannot be learnt from float targets");
    };
    assert!(
        err.to_string().contains("--loss mean_squared_error"),
        "{err}"
    );
}

/// The local plan: one worker takes every chunk and keeps the parameters
/// between rounds, which is exact minibatch SGD on one worker: the same
/// weights as the one-process replay with one worker, with the parameters
/// on the wire once per round instead of every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_plan_is_exact_sgd_on_one_worker() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = dataset(&client, 500, 3).await;
    let model = tiny_bn_model();
    let opts = TrainOptions {
        plan: Plan::Auto,
        display: 5,
        ..options(&model, 7)
    };
    let run = client.train(&mut ds, None, &opts, |_| {}).await.unwrap();
    let TrainEvent::Planned(d) = &run.events[0] else {
        panic!("first event is Planned: {:?}", run.events[0]);
    };
    // Three datanodes on one host share its cores: one worker is faster.
    assert_eq!(d.plan, Plan::Local, "{}", d.reason);
    assert!(d.reason.contains("1 host"), "{}", d.reason);
    assert_eq!(run.summary.plan, Plan::Local);
    assert_eq!(run.summary.workers, 1);
    assert_eq!(losses(&run.events).len(), 4, "a report every 5 of 20 steps");

    let mut chunks = Vec::new();
    for p in ds.part_paths() {
        let loc = client.locate(&p).await.unwrap();
        for ch in &loc.chunks {
            chunks.push(client.read_chunk(&p, ch).await.unwrap().0);
        }
    }
    let mut w = Worker::new(WorkerSpec {
        model_json: opts.model_json.clone(),
        layout: ds.manifest.layout.clone(),
        scaler: run.scaler.clone(),
        seed: opts.seed,
        objective: Default::default(),
        shuffle: true,
    })
    .unwrap();
    for ch in &chunks {
        w.add_chunk(ch).unwrap();
    }
    let mut params = model.params_from_flat(opts.init.clone()).unwrap();
    train_local(
        std::slice::from_mut(&mut w),
        &mut params,
        opts.optimizer.clone(),
        opts.batch,
        opts.epochs,
        opts.max_iter,
        |_, _| {},
    )
    .unwrap();
    assert_eq!(params.as_slice(), &run.params[..], "same final weights");

    let dist = client
        .train(
            &mut ds,
            None,
            &TrainOptions {
                plan: Plan::Distributed,
                ..opts.clone()
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(dist.summary.plan, Plan::Distributed);
    assert!(dist.summary.workers >= 2);
    assert!(
        run.summary.step_bytes * 3 < dist.summary.step_bytes,
        "local {} vs distributed {} bytes",
        run.summary.step_bytes,
        dist.summary.step_bytes
    );
}

/// Validation runs on the workers with the parameters they hold, after
/// the epoch's last step: the figures equal a score of the job's final
/// parameters sent the usual way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_scores_the_parameters_the_workers_hold() {
    let c = TestCluster::start(Options::default()).await;
    let client = c.client();
    let mut ds = dataset(&client, 400, 5).await;
    let (images, labels, _, _) = random_idx(150, 28, 28, 10, 11);
    let val = client
        .import_dataset(
            "/val",
            &parse_idx("images", &images, "labels", &labels).unwrap(),
            &ImportOptions {
                chunk_size: 785 * 40,
                replication: 1,
                ..ImportOptions::default()
            },
        )
        .await
        .unwrap();
    let model = tiny_model();
    let opts = TrainOptions {
        epochs: 2,
        max_iter: None,
        ..options(&model, 5)
    };
    let run = client
        .train(&mut ds, Some(&val), &opts, |_| {})
        .await
        .unwrap();
    assert!(run.summary.workers >= 2);
    let epochs: Vec<(f64, f64)> = run
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Epoch {
                val_loss: Some(l),
                val_accuracy: Some(a),
                ..
            } => Some((*l, *a)),
            _ => None,
        })
        .collect();
    assert_eq!(epochs.len(), 2);
    let (scores, _) = client
        .score(
            &val,
            &opts.model_json,
            &run.params,
            &run.scaler,
            opts.objective,
        )
        .await
        .unwrap();
    assert_eq!(epochs[1], (scores.loss(), scores.accuracy()));
    assert_ne!(
        epochs[0].0, epochs[1].0,
        "the first epoch scored its own parameters"
    );
}

/// A worker whose ring sends hang: the workers after it report their ring
/// peer, the coordinator counts the hung one as lost (not the ones that
/// reported it), a survivor's parameters seed the rest, and the job
/// finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_ring_sends_hang_is_the_one_lost() {
    let c = TestCluster::start(Options {
        job_lease: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let client = c.client_with(Duration::from_secs(5));
    let hung = c.datanodes[1].as_ref().unwrap().addr();
    let ds = dataset(&client, 600, 9).await;
    let model = tiny_model();
    let opts = TrainOptions {
        max_iter: Some(30),
        ..options(&model, 3)
    };
    let job = train_past_step_5(&client, ds, opts).await;
    c.datanodes[1].as_ref().unwrap().faults().add(Rule {
        direction: Direction::Outgoing,
        peer: None,
        kind: Some("TrainRing"),
        fault: Fault::Stall { after: 0 },
    });
    let run = job.await.unwrap().expect("training finishes");
    assert_eq!(losses(&run.events).len(), 30);
    let lost: Vec<String> = run
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::WorkerLost { worker, .. } => Some(worker.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(lost, vec![hung.to_string()]);
    assert!(run.params.iter().all(|p| p.is_finite()));
}

/// Workers exchanging BatchNormalization sums wait for the slowest of the
/// step, however much longer than a body's idle time that takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_for_a_slow_one_at_the_exchange_past_the_idle_time() {
    let c = TestCluster::start(Options {
        piece_idle: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    let client = c.client();
    let mut ds = dataset(&client, 500, 3).await;
    // One datanode starts each step 2.5 s late: the others reach the first
    // BatchNormalization layer and wait that long for its sums.
    c.datanodes[1].as_ref().unwrap().faults().add(Rule {
        direction: Direction::Incoming,
        peer: None,
        kind: Some("TrainStep"),
        fault: Fault::Delay(Duration::from_millis(2500)),
    });
    let model = tiny_bn_model();
    let opts = TrainOptions {
        max_iter: Some(2),
        ..options(&model, 7)
    };
    let run = client.train(&mut ds, None, &opts, |_| {}).await.unwrap();
    assert_eq!(run.summary.workers_lost, 0, "{:?}", run.events);
    assert_eq!(run.summary.iterations, 2);
}
