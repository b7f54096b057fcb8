//! The Python package (`python/`), built and tested as a user installs it:
//! `pip install ./python` into the Python that QUERN_KERAS_PYTHON names
//! (`.ci/run` makes one, with Keras, pytest and Jupyter), then its pytest
//! suite against clusters started by this build's `quern` binary.

use quern_tests::quern_bin;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_python_package_installs_and_passes_its_tests() {
    let Some(python) = std::env::var_os("QUERN_KERAS_PYTHON") else {
        eprintln!(
            "the Python package is not tested: set QUERN_KERAS_PYTHON to a Python with pytest \
             (.ci/run does)"
        );
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let install = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(root.join("python"))
        .status()
        .expect("run pip");
    assert!(install.success(), "pip install ./python failed");
    // From the repository root, so that `import quern` is the installed
    // package, not the source directory.
    let tests = Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("python/tests"))
        .current_dir(&root)
        .env("QUERN_BIN", quern_bin())
        .env_remove("QUERN_CONFIG")
        .status()
        .expect("run pytest");
    assert!(tests.success(), "the Python package's tests failed");
}
