//! Datasets through the real `quern` binary: import, info, stats (with a
//! datanode SIGKILLed), export, and every bad input leaving nothing behind.

use quern_tests::*;
use std::io::Read;
use std::path::Path;

fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

fn stats_json(r: &Run) -> serde_json::Value {
    ok(r);
    serde_json::from_str(&r.stdout).expect("stats --json parses")
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Checks `stats --json` output against the arrays themselves.
fn check_stats(doc: &serde_json::Value, pixels: &[u8], labels: &[u8], width: usize) {
    let f: Vec<f32> = pixels.iter().map(|&p| f32::from(p)).collect();
    let l: Vec<u32> = labels.iter().map(|&p| u32::from(p)).collect();
    let got: quern_compute::ops::DatasetStats =
        serde_json::from_value(doc["stats"].clone()).expect("stats document");
    assert_stats_eq(&got, &direct_stats(&f, &l, width));
}

#[test]
fn import_info_stats_with_a_killed_datanode_and_export() {
    let c = BinCluster::up(3, &["--dead-timeout", "60s"]);
    let local = tempfile::tempdir().unwrap();
    let (images, labels, pixels, labs) = random_idx(3000, 8, 8, 10, 21);
    let img = write(local.path(), "img.idx", &images);
    let lab = write(local.path(), "lab.idx", &labels);
    let imp = c.quern(&[
        "dataset",
        "import",
        "idx",
        "--images",
        &img,
        "--labels",
        &lab,
        "/data/rand",
        "--chunk-size",
        "16K",
        "--replication",
        "2",
        "--class-names",
        "a,b,c,d,e,f,g,h,i,j",
    ]);
    ok(&imp);
    assert!(imp.stdout.contains("3000 records"), "{}", imp.stdout);

    let info = c.quern(&["dataset", "info", "/data/rand", "--json"]);
    ok(&info);
    let doc: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(doc["manifest"]["records"], 3000);
    assert_eq!(doc["manifest"]["record_size"], 65);
    let chunks = doc["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), (3000 * 65usize).div_ceil(16380));
    let mut next = 0;
    for ch in chunks {
        assert_eq!(ch["first_record"], next);
        next += ch["records"].as_u64().unwrap();
        assert_eq!(ch["holders"].as_array().unwrap().len(), 2);
    }
    assert_eq!(next, 3000);
    let text = c.quern(&["dataset", "info", "/data/rand"]);
    ok(&text);
    assert!(
        text.stdout.contains("part-00000") && text.stdout.contains("not computed"),
        "{}",
        text.stdout
    );

    let text = c.quern(&["dataset", "stats", "/data/rand"]);
    ok(&text);
    assert!(text.stdout.contains("records   3000"), "{}", text.stdout);
    assert!(text.stderr.contains("100% node-local"), "{}", text.stderr);
    let first = stats_json(&c.quern(&["dataset", "stats", "/data/rand", "--json"]));
    check_stats(&first, &pixels, &labs, 64);
    assert_eq!(first["job"]["remote"], 0);
    assert_eq!(first["job"]["node_local"], first["job"]["tasks"]);

    // SIGKILL a datanode; the namenode still thinks it is alive, so the
    // job's tasks there fail and run again on the other holder.
    c.sigkill("datanode", 1);
    let run = c.quern(&["dataset", "stats", "/data/rand", "--json"]);
    assert!(run.stderr.contains("retrying elsewhere"), "{}", run.stderr);
    let again = stats_json(&run);
    assert_eq!(
        again["stats"], first["stats"],
        "same result with a dead node"
    );
    assert!(!again["job"]["retries"].as_array().unwrap().is_empty());
    let info = c.quern(&["dataset", "info", "/data/rand"]);
    assert!(info.stdout.contains("computed (see"), "{}", info.stdout);

    // Export: x (3000, 8, 8, 1) uint8 and y (3000,) uint8, byte-equal.
    let out = local.path().join("rand.npz");
    ok(&c.quern(&[
        "dataset",
        "export",
        "/data/rand",
        "--format",
        "npz",
        out.to_str().unwrap(),
    ]));
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&out).unwrap()).unwrap();
    let mut read = |name: &str| {
        let mut b = Vec::new();
        zip.by_name(name).unwrap().read_to_end(&mut b).unwrap();
        b
    };
    let x = read("x.npy");
    let y = read("y.npy");
    let header = String::from_utf8_lossy(&x[..128]).to_string();
    assert!(
        header.contains("'descr': '|u1'") && header.contains("(3000, 8, 8, 1)"),
        "{header}"
    );
    assert_eq!(&x[x.len() - pixels.len()..], &pixels[..]);
    assert_eq!(&y[y.len() - labs.len()..], &labs[..]);
    let again = c.quern(&["dataset", "export", "/data/rand", out.to_str().unwrap()]);
    assert_ne!(again.status, 0);
    assert!(
        again.stderr.contains("exists") && again.stderr.contains("--force"),
        "{}",
        again.stderr
    );
}

#[test]
fn bad_imports_fail_clearly_and_store_nothing() {
    let c = BinCluster::up(1, &[]);
    let local = tempfile::tempdir().unwrap();
    let (images, labels, _, _) = random_idx(50, 4, 4, 3, 5);
    let good_lab = write(local.path(), "lab", &labels);
    let good_img = write(local.path(), "img", &images);
    let truncated = write(local.path(), "trunc", &images[..images.len() - 5]);
    let mut magic = images.clone();
    magic[2] = 0x0d;
    let magic = write(local.path(), "magic", &magic);
    let mut notidx = images.clone();
    notidx[0] = b'P';
    let notidx = write(local.path(), "notidx", &notidx);
    let (_, fewer, _, _) = random_idx(49, 4, 4, 3, 5);
    let fewer = write(local.path(), "fewer", &fewer);
    let csv = write(
        local.path(),
        "bad.csv",
        b"x,y,label\n1,2,0\n3,4,1\n5,abc,1\n",
    );
    let csv_neg = write(local.path(), "neg.csv", b"1,2,0\n3,4,-2\n");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["idx", "--images", &truncated, "--labels", &good_lab, "/x"],
            vec!["trunc", "truncated"],
        ),
        (
            vec!["idx", "--images", &magic, "--labels", &good_lab, "/x"],
            vec!["magic", "element type"],
        ),
        (
            vec!["idx", "--images", &notidx, "--labels", &good_lab, "/x"],
            vec!["notidx", "magic number"],
        ),
        (
            vec!["idx", "--images", &good_img, "--labels", &fewer, "/x"],
            vec!["50 images", "49 labels"],
        ),
        (
            vec!["idx", "--images", &good_lab, "--labels", &good_img, "/x"],
            vec!["dimensions"],
        ),
        (
            vec![
                "idx",
                "--images",
                "/no/such.idx",
                "--labels",
                &good_lab,
                "/x",
            ],
            vec!["/no/such.idx", "No such file"],
        ),
        (
            vec!["csv", &csv, "/x", "--label-column", "label", "--header"],
            vec!["bad.csv", "line 4", "abc"],
        ),
        (
            vec!["csv", &csv_neg, "/x", "--label-column", "2"],
            vec!["line 2", "-2"],
        ),
        (
            vec!["csv", &csv, "/x", "--label-column", "nope", "--header"],
            vec!["no column named 'nope'"],
        ),
        (
            vec![
                "idx", "--images", &good_img, "--labels", &good_lab, "relative",
            ],
            vec!["relative"],
        ),
    ];
    for (args, wants) in cases {
        let mut full = vec!["dataset", "import"];
        full.extend(args.iter());
        let r = c.quern(&full);
        assert_ne!(r.status, 0, "{full:?} succeeded");
        assert_eq!(
            r.stderr.trim().lines().count(),
            1,
            "{full:?}: one line: {}",
            r.stderr
        );
        for w in wants {
            assert!(
                r.stderr.contains(w),
                "{full:?}: missing {w:?} in {}",
                r.stderr
            );
        }
        let ls = c.quern(&["ls", "-R", "/"]);
        ok(&ls);
        assert_eq!(ls.stdout.trim(), "", "{full:?} left {}", ls.stdout);
    }
    // A good import, then the same name again: refused, first one intact.
    ok(&c.quern(&[
        "dataset", "import", "idx", "--images", &good_img, "--labels", &good_lab, "/x", "-r", "1",
    ]));
    let r = c.quern(&[
        "dataset", "import", "idx", "--images", &good_img, "--labels", &good_lab, "/x", "-r", "1",
    ]);
    assert_ne!(r.status, 0);
    assert!(
        r.stderr.contains("/x") && r.stderr.contains("exists"),
        "{}",
        r.stderr
    );
    ok(&c.quern(&["dataset", "stats", "/x"]));
    let r = c.quern(&["dataset", "stats", "/missing"]);
    assert!(
        r.stderr.contains("/missing") && r.stderr.contains("no such dataset"),
        "{}",
        r.stderr
    );
}

/// The reference data, when Debian's dataset-fashion-mnist is installed
/// (.ci/run installs it).
#[test]
fn fashion_mnist_stats_match_the_arrays() {
    let Some((images, labels)) = fashion_test_files() else {
        return;
    };
    let c = BinCluster::up(3, &[]);
    ok(&c.import_idx(&images, &labels, "/fashion/test", &[]));
    let doc = stats_json(&c.quern(&["dataset", "stats", "/fashion/test", "--json"]));
    let raw_images = gunzip(&images);
    let raw_labels = gunzip(&labels);
    check_stats(&doc, &raw_images[16..], &raw_labels[8..], 784);
    assert_eq!(doc["stats"]["count"], 10000);
    assert_eq!(
        doc["stats"]["label_counts"],
        serde_json::json!(vec![1000; 10])
    );
    assert_eq!(doc["job"]["remote"], 0);
}
