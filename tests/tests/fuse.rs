//! `quern mount`: real FUSE mounts of real clusters, driven with the tools
//! people use on them (cp, rsync, tar, diff, Python).

use quern_tests::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(cmd: &mut Command) -> Run {
    let r: Run = cmd.output().expect("run command").into();
    ok(&r);
    r
}

fn is_mounted(mp: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap_or("")))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A background `quern mount`; unmounted on drop even when the test fails.
struct Mounted {
    _dir: tempfile::TempDir,
    mp: PathBuf,
    log: PathBuf,
    pid: i32,
}

/// True while `pid` runs (a zombie has exited).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn wait_gone(pid: i32, mp: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (is_mounted(mp) || alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mounted(mp), "{} still mounted", mp.display());
    assert!(!alive(pid), "mount process {pid} still running");
}

impl Mounted {
    fn new(c: &BinCluster, extra: &[&str]) -> Mounted {
        assert!(
            Path::new("/dev/fuse").exists(),
            "FUSE tests need /dev/fuse: apt-get install fuse3 (in a container, pass --device /dev/fuse)"
        );
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().canonicalize().unwrap().join("mnt");
        std::fs::create_dir(&mp).unwrap();
        let log = dir.path().join("mount.log");
        let mut args = vec![
            "mount",
            mp.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let r = c.quern(&args);
        ok(&r);
        assert!(
            is_mounted(&mp),
            "{} not mounted: {}",
            mp.display(),
            r.stdout
        );
        let pid = r
            .stdout
            .split("(pid ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.parse().ok())
            .expect("pid in mount output");
        Mounted {
            _dir: dir,
            mp,
            log,
            pid,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mp.join(rel)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mp) {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.mp).output();
        }
        if is_mounted(&self.mp) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mp)
                .output();
        }
    }
}

fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn local_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir_all(root.join("c")).unwrap();
    std::fs::write(root.join("top.txt"), b"top level\n").unwrap();
    std::fs::write(root.join("a/empty"), b"").unwrap();
    std::fs::write(root.join("a/b/one.bin"), random_bytes((1 << 20) + 13, 1)).unwrap();
    std::fs::write(root.join("c/big.bin"), random_bytes(3 << 20, 2)).unwrap();
    std::fs::write(root.join("c/with space.txt"), b"spaces are fine\n").unwrap();
    // Holes: cp seeks over them, and the mount fills them with zeros.
    let mut sparse = std::fs::File::create(root.join("c/sparse.bin")).unwrap();
    sparse.write_all(&random_bytes(100_000, 6)).unwrap();
    sparse.seek(SeekFrom::Start(3 << 20)).unwrap();
    sparse.write_all(&random_bytes(100_000, 7)).unwrap();
    sparse.set_len(6 << 20).unwrap();
    let mut p = std::fs::metadata(root.join("top.txt"))
        .unwrap()
        .permissions();
    p.set_mode(0o600);
    std::fs::set_permissions(root.join("top.txt"), p).unwrap();
}

fn tar_listing(archive: &Path) -> Vec<String> {
    let r = sh(Command::new("tar").arg("-tvf").arg(archive));
    let mut lines: Vec<String> = r.stdout.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

#[test]
fn copy_trees_tar_python_and_cli_agree() {
    let c = BinCluster::up(3, &[]);
    let m = Mounted::new(&c, &["--chunk-size", "256K"]);
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("src");
    local_tree(&src);

    // cp -r in, diff -r, and the CLI reads the same bytes.
    sh(Command::new("cp").arg("-r").arg(&src).arg(m.path("cp")));
    sh(Command::new("diff").arg("-r").arg(&src).arg(m.path("cp")));
    let back = local.path().join("big.back");
    ok(&c.quern(&["get", "/cp/c/big.bin", back.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(src.join("c/big.bin")).unwrap()
    );
    let stat = c.quern(&["stat", "--json", "/cp/c/big.bin"]);
    ok(&stat);
    assert!(stat.stdout.contains("\"chunks\": 12"), "{}", stat.stdout);

    // A second, read-only mount of one remote directory.
    let sub = Mounted::new(&c, &["--remote-root", "/cp/c", "--read-only"]);
    sh(Command::new("diff")
        .arg("-r")
        .arg(src.join("c"))
        .arg(&sub.mp));
    drop(sub);

    if have("rsync") {
        let mut from = src.clone().into_os_string();
        from.push("/");
        sh(Command::new("rsync").arg("-a").arg(&from).arg(m.path("rs")));
        sh(Command::new("diff").arg("-r").arg(&src).arg(m.path("rs")));
    } else {
        eprintln!("rsync is not installed: rsync -a skipped (cp -r covered the tree copy)");
    }

    // tar -x into the mount, tar -c out: same names, sizes, modes, times.
    let arch = local.path().join("in.tar");
    sh(Command::new("tar")
        .arg("-cf")
        .arg(&arch)
        .arg("-C")
        .arg(&src)
        .arg("."));
    std::fs::create_dir(m.path("untar")).unwrap();
    sh(Command::new("tar")
        .arg("-xf")
        .arg(&arch)
        .arg("-C")
        .arg(m.path("untar")));
    let out = local.path().join("out.tar");
    sh(Command::new("tar")
        .arg("-cf")
        .arg(&out)
        .arg("-C")
        .arg(m.path("untar"))
        .arg("."));
    assert_eq!(tar_listing(&arch), tar_listing(&out));
    let again = local.path().join("again");
    std::fs::create_dir(&again).unwrap();
    sh(Command::new("tar")
        .arg("-xf")
        .arg(&out)
        .arg("-C")
        .arg(&again));
    sh(Command::new("diff").arg("-r").arg(&src).arg(&again));

    // A file put by the CLI shows up in the mount.
    let cli_src = local.path().join("cli.bin");
    let cli_data = random_bytes(700_000, 3);
    std::fs::write(&cli_src, &cli_data).unwrap();
    ok(&c.quern(&["put", cli_src.to_str().unwrap(), "/cli.bin"]));
    assert_eq!(std::fs::read(m.path("cli.bin")).unwrap(), cli_data);

    // Python: sequential writes through open('wb'), then random-offset
    // reads (seek+read, pread, mmap) against the local copy.
    let py = format!(
        r#"
import mmap, os, random
mnt, local = {mnt:?}, {local:?}
rng = random.Random(5)
data = bytes(rng.getrandbits(8) for _ in range(1_500_000))
with open(os.path.join(local, "py.bin"), "wb") as f:
    f.write(data)
with open(os.path.join(mnt, "py.bin"), "wb") as f:
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 300_000)
        f.write(data[pos:pos + n])
        pos += n
with open(os.path.join(mnt, "py.bin"), "rb") as f:
    assert f.read() == data
    for _ in range(200):
        off = rng.randrange(0, len(data) + 10)
        n = rng.randint(0, 400_000)
        f.seek(off)
        assert f.read(n) == data[off:off + n], (off, n)
        assert os.pread(f.fileno(), n, off) == data[off:off + n], (off, n)
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    for _ in range(100):
        off = rng.randrange(0, len(data))
        n = rng.randint(0, 100_000)
        assert mm[off:off + n] == data[off:off + n], (off, n)
    mm.close()
try:
    import numpy as np
except ImportError:
    print("SKIP numpy: numpy is not installed")
else:
    a = np.random.default_rng(1).standard_normal((300, 257)).astype(np.float32)
    np.save(os.path.join(mnt, "arr.npy"), a)
    assert np.array_equal(np.load(os.path.join(mnt, "arr.npy")), a)
    mm = np.load(os.path.join(mnt, "arr.npy"), mmap_mode="r")
    for _ in range(50):
        i = rng.randrange(0, 300)
        assert np.array_equal(mm[i], a[i])
    print("numpy ok")
print("python ok")
"#,
        mnt = m.mp.to_str().unwrap(),
        local = local.path().to_str().unwrap()
    );
    let r = sh(Command::new("python3").args(["-c", &py]));
    assert!(r.stdout.contains("python ok"), "{}{}", r.stdout, r.stderr);
    if r.stdout.contains("SKIP numpy") {
        eprintln!("numpy is not installed: numpy.save/numpy.load through the mount skipped");
    }
    let py_back = local.path().join("py.back");
    ok(&c.quern(&["get", "/py.bin", py_back.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(&py_back).unwrap(),
        std::fs::read(local.path().join("py.bin")).unwrap()
    );

    // Many readers of one file at once, whole and at random offsets.
    let want = std::fs::read(src.join("c/big.bin")).unwrap();
    let file = m.path("cp/c/big.bin");
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let (want, file) = (&want, &file);
            s.spawn(move || {
                if t % 2 == 0 {
                    assert_eq!(&std::fs::read(file).unwrap(), want);
                } else {
                    let f = std::fs::File::open(file).unwrap();
                    let mut buf = vec![0u8; 65536 + 7];
                    for i in 0..40u64 {
                        let off = (i * 7919 * 131 + t * 104_729) % (want.len() as u64 - 1000);
                        let n = f.read_at(&mut buf, off).unwrap();
                        assert!(n > 0);
                        assert_eq!(&buf[..n], &want[off as usize..off as usize + n]);
                    }
                }
            });
        }
    });

    sh(Command::new("fusermount3").arg("-u").arg(&m.mp));
    wait_gone(m.pid, &m.mp);
}

#[test]
fn namespace_changes_errors_and_read_only() {
    let c = BinCluster::up(3, &[]);
    let m = Mounted::new(&c, &[]);

    // mkdir -p, rename of files and directories, rm -r.
    sh(Command::new("mkdir").arg("-p").arg(m.path("d1/d2/d3")));
    let ls = c.quern(&["ls", "/d1/d2"]);
    ok(&ls);
    assert!(ls.stdout.contains("/d1/d2/d3"), "{}", ls.stdout);
    std::fs::write(m.path("d1/f.txt"), b"one").unwrap();
    std::fs::rename(m.path("d1/f.txt"), m.path("d1/g.txt")).unwrap();
    assert_eq!(std::fs::read(m.path("d1/g.txt")).unwrap(), b"one");
    std::fs::write(m.path("d1/h.txt"), b"two").unwrap();
    std::fs::rename(m.path("d1/g.txt"), m.path("d1/h.txt")).unwrap();
    assert_eq!(std::fs::read(m.path("d1/h.txt")).unwrap(), b"one");
    assert!(!m.path("d1/g.txt").exists());
    std::fs::write(m.path("d1/d2/d3/deep.txt"), b"deep").unwrap();
    std::fs::rename(m.path("d1/d2"), m.path("d1/e2")).unwrap();
    assert_eq!(std::fs::read(m.path("d1/e2/d3/deep.txt")).unwrap(), b"deep");
    std::fs::write(m.path("d1/e2/d3/new.txt"), b"new").unwrap();
    let cat = c.command(&["cat", "/d1/e2/d3/new.txt"]).output().unwrap();
    assert_eq!(cat.stdout, b"new");
    std::fs::create_dir(m.path("full")).unwrap();
    std::fs::write(m.path("full/x"), b"x").unwrap();
    assert_eq!(
        errno_of(std::fs::rename(m.path("d1/e2"), m.path("full"))),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(std::fs::rename(m.path("d1/h.txt"), m.path("full"))),
        libc::EISDIR
    );
    sh(Command::new("rm").arg("-r").arg(m.path("d1")));
    assert!(!m.path("d1").exists());
    assert_ne!(c.quern(&["stat", "/d1"]).status, 0);

    // chmod, touch, truncate, append: stored in the namenode.
    std::fs::write(m.path("f"), b"hello").unwrap();
    sh(Command::new("chmod").arg("600").arg(m.path("f")));
    sh(Command::new("touch")
        .arg("-m")
        .arg("-d")
        .arg("@1600000000")
        .arg(m.path("f")));
    let meta = std::fs::metadata(m.path("f")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.mtime(), 1_600_000_000);
    let st = c.quern(&["stat", "--json", "/f"]);
    ok(&st);
    assert!(st.stdout.contains("\"mode\": 384"), "{}", st.stdout);
    assert!(
        st.stdout.contains("\"mtime_ms\": 1600000000000"),
        "{}",
        st.stdout
    );
    let ls = sh(Command::new("ls").arg("-l").arg(&m.mp));
    assert!(ls.stdout.contains("-rw------- 1"), "{}", ls.stdout);
    sh(Command::new("touch").arg(m.path("touched")));
    assert_eq!(std::fs::metadata(m.path("touched")).unwrap().len(), 0);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.path("f"))
        .unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"hello world");
    let cat = c.command(&["cat", "/f"]).output().unwrap();
    assert_eq!(cat.stdout, b"hello world");
    // O_TRUNC replaces the file atomically at close.
    let mut f = std::fs::File::create(m.path("f")).unwrap();
    f.write_all(b"replacement").unwrap();
    let cat = c.command(&["cat", "/f"]).output().unwrap();
    assert_eq!(cat.stdout, b"hello world");
    drop(f);
    let cat = c.command(&["cat", "/f"]).output().unwrap();
    assert_eq!(cat.stdout, b"replacement");
    let df = sh(Command::new("df")
        .args(["-B1", "--output=size,avail"])
        .arg(&m.mp));
    let sizes: Vec<u64> = df
        .stdout
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        sizes.len() == 2 && sizes[0] > 0 && sizes[1] > 0,
        "{}",
        df.stdout
    );
    // fsync makes what was written visible; writing on appends.
    let mut f = std::fs::File::create(m.path("synced")).unwrap();
    f.write_all(b"first").unwrap();
    f.sync_all().unwrap();
    let cat = c.command(&["cat", "/synced"]).output().unwrap();
    assert_eq!(cat.stdout, b"first");
    f.write_all(b" second").unwrap();
    drop(f);
    let cat = c.command(&["cat", "/synced"]).output().unwrap();
    assert_eq!(cat.stdout, b"first second");
    std::fs::write(m.path("f"), b"hello world").unwrap();
    sh(Command::new("truncate").arg("-s").arg("0").arg(m.path("f")));
    assert_eq!(std::fs::metadata(m.path("f")).unwrap().len(), 0);
    assert!(c
        .quern(&["stat", "--json", "/f"])
        .stdout
        .contains("\"size\": 0"));
    std::fs::write(m.path("f"), b"0123456789").unwrap();
    let r = Command::new("truncate")
        .arg("-s")
        .arg("4")
        .arg(m.path("f"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    std::fs::write(m.path("grow"), b"0123456789").unwrap();
    sh(Command::new("truncate")
        .arg("-s")
        .arg("20")
        .arg(m.path("grow")));
    let mut grown = b"0123456789".to_vec();
    grown.resize(20, 0);
    assert_eq!(std::fs::read(m.path("grow")).unwrap(), grown);
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(m.path("grow"))
        .arg(m.path("grow2")));
    assert_eq!(std::fs::read(m.path("grow2")).unwrap(), grown);

    // Errors map to the errno programs expect.
    assert_eq!(errno_of(std::fs::create_dir(m.path("full"))), libc::EEXIST);
    assert_eq!(
        errno_of(std::fs::remove_dir(m.path("full"))),
        libc::ENOTEMPTY
    );
    assert_eq!(errno_of(std::fs::remove_dir(m.path("f"))), libc::ENOTDIR);
    assert_eq!(errno_of(std::fs::remove_file(m.path("full"))), libc::EISDIR);
    assert_eq!(errno_of(std::fs::File::open(m.path("nope"))), libc::ENOENT);
    assert_eq!(
        errno_of(std::fs::write(m.path("nope/x"), b"")),
        libc::ENOENT
    );
    assert_eq!(errno_of(std::fs::read_dir(m.path("f"))), libc::ENOTDIR);
    assert_eq!(
        errno_of(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.path("f"))
        ),
        libc::EEXIST
    );

    // A write anywhere but the end: EOPNOTSUPP and one log line saying why.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(m.path("f"))
        .unwrap();
    f.seek(SeekFrom::Start(3)).unwrap();
    assert_eq!(errno_of(f.write_all(b"xx")), libc::EOPNOTSUPP);
    drop(f);
    let log = m.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("write at offset"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("/f: write at offset 3 refused (EOPNOTSUPP)"),
        "{log}"
    );
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"0123456789");

    // A read-only mount of the same cluster reads and refuses changes.
    let ro = Mounted::new(&c, &["--read-only"]);
    let mut buf = String::new();
    std::fs::File::open(ro.path("f"))
        .unwrap()
        .read_to_string(&mut buf)
        .unwrap();
    assert_eq!(buf, "0123456789");
    assert_eq!(errno_of(std::fs::write(ro.path("new"), b"x")), libc::EROFS);
    assert_eq!(
        errno_of(std::fs::create_dir(ro.path("newdir"))),
        libc::EROFS
    );
    assert_eq!(errno_of(std::fs::remove_file(ro.path("f"))), libc::EROFS);
    assert_eq!(
        errno_of(std::fs::OpenOptions::new().append(true).open(ro.path("f"))),
        libc::EROFS
    );

    // SIGINT and SIGTERM both unmount cleanly.
    // SAFETY: signals to the mount processes this test started.
    unsafe { libc::kill(ro.pid, libc::SIGINT) };
    wait_gone(ro.pid, &ro.mp);
    unsafe { libc::kill(m.pid, libc::SIGTERM) };
    wait_gone(m.pid, &m.mp);
    assert!(m.log().contains("unmounted"), "{}", m.log());
}

#[test]
fn operations_fail_in_bounded_time_without_a_namenode() {
    let c = BinCluster::up(1, &[]);
    let m = Mounted::new(&c, &["--timeout", "2s", "--replication", "1"]);
    std::fs::write(m.path("before.txt"), b"written").unwrap();
    assert_eq!(std::fs::read(m.path("before.txt")).unwrap(), b"written");

    // No replica readable: EIO, and a log line naming the chunk.
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("only.bin");
    std::fs::write(&src, random_bytes(1000, 4)).unwrap();
    ok(&c.quern(&["put", "-r", "1", src.to_str().unwrap(), "/only.bin"]));
    c.sigkill("datanode", 0);
    let t = Instant::now();
    assert_eq!(errno_of(std::fs::read(m.path("only.bin"))), libc::EIO);
    assert!(t.elapsed() < Duration::from_secs(12), "{:?}", t.elapsed());
    let log = m.log();
    assert!(
        log.lines()
            .any(|l| l.contains("/only.bin: chunk 0 (chunk-") && l.contains("EIO")),
        "{log}"
    );

    c.sigkill("namenode", 0);
    // Let the kernel's cached entries expire.
    std::thread::sleep(Duration::from_millis(1200));
    let bounded = |what: &str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        assert!(!f(), "{what} succeeded without a namenode");
        let took = t.elapsed();
        assert!(took < Duration::from_secs(12), "{what} took {took:?}");
    };
    bounded("stat", &|| std::fs::metadata(m.path("other")).is_ok());
    bounded("ls", &|| std::fs::read_dir(&m.mp).is_ok());
    bounded("create", &|| {
        std::fs::write(m.path("after.txt"), b"x").is_ok()
    });
    bounded("mkdir", &|| std::fs::create_dir(m.path("dir")).is_ok());
    assert!(
        m.log().contains("ETIMEDOUT") || m.log().contains("cannot reach"),
        "{}",
        m.log()
    );
    let t = Instant::now();
    ok(&c.quern(&["umount", m.mp.to_str().unwrap()]));
    wait_gone(m.pid, &m.mp);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn owners_and_modes_show_and_refusals_are_eacces() {
    let c = BinCluster::up(1, &[]);
    let dir = c.dir.path().display().to_string();
    for u in ["alice", "bob"] {
        ok(&Command::new(quern_bin())
            .args(["cluster", "add-user", u, "--dir", &dir])
            .output()
            .unwrap()
            .into());
    }
    let as_user = |u: &str| c.dir.path().join(format!("users/{u}.toml"));
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("s");
    std::fs::write(&src, "bob's words").unwrap();
    for (remote, mode) in [("/user/bob/secret", "600"), ("/user/bob/public", "644")] {
        ok(&c.quern(&[
            "--config",
            as_user("bob").to_str().unwrap(),
            "put",
            src.to_str().unwrap(),
            remote,
            "--mode",
            mode,
            "-r",
            "1",
        ]));
    }
    let alice = as_user("alice");
    let m = Mounted::new(&c, &["--config", alice.to_str().unwrap()]);
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let secret = std::fs::metadata(m.path("user/bob/secret")).unwrap();
    assert_eq!(secret.permissions().mode() & 0o7777, 0o600);
    assert_ne!(secret.uid(), me, "bob's file is not the mounting user's");
    let home = std::fs::metadata(m.path("user/alice")).unwrap();
    assert_eq!(home.uid(), me, "alice's home shows as the mounting user's");
    assert_eq!(home.permissions().mode() & 0o7777, 0o755);

    let eacces = libc::EACCES;
    assert_eq!(errno_of(std::fs::read(m.path("user/bob/secret"))), eacces);
    assert_eq!(
        std::fs::read_to_string(m.path("user/bob/public")).unwrap(),
        "bob's words"
    );
    assert_eq!(
        errno_of(std::fs::remove_file(m.path("user/bob/public"))),
        eacces
    );
    assert_eq!(
        errno_of(std::fs::write(m.path("user/bob/public"), "mine")),
        eacces
    );
    assert_eq!(
        errno_of(std::fs::write(m.path("user/bob/new"), "mine")),
        eacces
    );
    assert_eq!(errno_of(std::fs::create_dir(m.path("user/bob/d"))), eacces);
    // Alice's own directory takes her files.
    std::fs::write(m.path("user/alice/notes"), "alice's").unwrap();
    let r = c.quern(&["ls", "-l", "/user/alice"]);
    assert!(r.stdout.contains(" alice "), "{}", r.stdout);
    // Nothing of bob's changed.
    let r = c.quern(&["cat", "/user/bob/public"]);
    assert_eq!(r.stdout, "bob's words");
    drop(m);
}
