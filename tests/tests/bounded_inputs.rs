//! Bounded inputs through the real `quern` binary: a gzip bomb given as an
//! IDX images file is refused after inflating one byte more than its header
//! promises, stores nothing, and the importing process stays small.
//!
//! This file holds a single test on purpose: it measures its children's
//! peak memory, which any other test of the same process spawning
//! children concurrently would blur.

use quern_tests::*;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What the bomb inflates to past its header's promise: the memory an
/// importer that inflates everything would need.
const BOMB_ZEROS: usize = 1 << 30;
/// The most the import process may peak at, in KiB (ru_maxrss's unit):
/// far below the 1 GiB an unbounded inflate has to hold, far above what
/// the binary needs to read a 1 MiB file and talk to the cluster.
const MAX_CHILD_RSS_KIB: libc::c_long = 400 << 10;

/// The largest peak resident set, in KiB, among the children this process
/// has waited for so far (and their waited-for descendants).
fn children_max_rss_kib() -> libc::c_long {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage it is pointed at; zeroed is a
    // valid rusage (plain integers) should it not.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: initialised above (zeroed, then filled).
    unsafe { usage.assume_init() }.ru_maxrss
}

/// Writes an IDX images file promising 10 images of 28x28 (7840 bytes)
/// followed by `BOMB_ZEROS` zeros, gzipped at best compression, streaming
/// so this process never holds the inflated bytes either.
fn write_bomb(path: &Path) -> u64 {
    let header_and_images = idx_file(&[10, 28, 28], &random_bytes(10 * 28 * 28, 7));
    let file = std::fs::File::create(path).expect("create bomb");
    let mut gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::best());
    gz.write_all(&header_and_images).expect("write bomb");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..BOMB_ZEROS / zeros.len() {
        gz.write_all(&zeros).expect("write bomb");
    }
    gz.finish()
        .expect("finish bomb")
        .into_inner()
        .expect("flush bomb");
    std::fs::metadata(path).expect("bomb written").len()
}

#[test]
fn gzip_bomb_idx_is_refused_with_bounded_memory() {
    let local = tempfile::tempdir().unwrap();
    let bomb = local.path().join("bomb-images-idx3-ubyte.gz");
    let started = Instant::now();
    let size = write_bomb(&bomb);
    assert!(size < 8 << 20, "the bomb is small on disk: {size} bytes");
    eprintln!("bomb: {size} bytes in {:?}", started.elapsed());
    let labels = local.path().join("labels-idx1-ubyte");
    std::fs::write(&labels, idx_file(&[10], &[1; 10])).unwrap();

    let c = BinCluster::up(1, &[]);
    let r = c.import_idx(&bomb, &labels, "/ds/x", &[]);
    // Read right after the import was waited for: ru_maxrss of
    // RUSAGE_CHILDREN is the largest peak of any single child waited for so
    // far (a maximum, not a sum). The children before it (`quern cluster
    // up`) count too, so this is an upper bound on the import's own peak,
    // which is all the assertion below needs: if it holds, the import
    // stayed under it. The daemons `cluster up` started are not children
    // this process waits for, so they do not count.
    let peak_kib = children_max_rss_kib();

    assert_ne!(r.status, 0, "the bomb was imported: {}", r.stdout);
    let err = r.stderr.trim();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    // Header 16 bytes + 10 * 28 * 28 pixels.
    let promise = "inflates past the 7856 bytes its header promises";
    for want in [
        bomb.display().to_string().as_str(),
        promise,
        "gzip bomb",
        "nothing was stored",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    let ls = c.quern(&["ls", "-R", "/"]);
    assert_eq!(ls.status, 0, "{}", ls.stderr);
    assert_eq!(ls.stdout.trim(), "", "the failed import left {}", ls.stdout);

    assert!(peak_kib > 0, "ru_maxrss is reported");
    assert!(
        peak_kib < MAX_CHILD_RSS_KIB,
        "a child peaked at {peak_kib} KiB, not below {MAX_CHILD_RSS_KIB} KiB: \
         the import inflated more than its header promised"
    );
    eprintln!(
        "import peak <= {peak_kib} KiB; whole test {:?}",
        started.elapsed()
    );
}
