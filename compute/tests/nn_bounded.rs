//! `.keras` archives and `.npz` weights are inflated only within limits:
//! entries that declare, or actually inflate to, more than their kind can
//! need are refused with an error naming the archive, the entry, the size
//! and the limit. (That real archives still load is nn_keras.rs's job.)

use std::io::{Cursor, Read, Write};
use std::path::PathBuf;

use quern_compute::nn::{npy, Model, NnError};

const MIB: usize = 1 << 20;
/// The limits, as the library states them in its errors.
const JSON_LIMIT: u64 = 16 << 20;
const WEIGHTS_OVERHEAD: u64 = 16 << 20;
const WEIGHTS_PER_PARAM: u64 = 32;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keras")
        .join(name)
}

/// The entries of a fixture `.keras` archive, in order.
fn entries(name: &str) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().to_string(), data)
        })
        .collect()
}

/// A deflated zip of `entries`; sizes as the zip writer records them.
fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(9));
    for (name, data) in entries {
        w.start_file(name.as_str(), opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Rewrites the uncompressed size `entry` declares (local header and
/// central directory) to `size`, as a crafted archive would.
fn lie_about_size(zip: &mut [u8], entry: &str, size: u32) {
    let name = entry.as_bytes();
    let mut patched = 0;
    for i in 0..zip.len().saturating_sub(46) {
        let (sig, size_at, name_len_at, name_at) = match &zip[i..i + 4] {
            [0x50, 0x4b, 0x03, 0x04] => ("local", 22, 26, 30),
            [0x50, 0x4b, 0x01, 0x02] => ("central", 24, 28, 46),
            _ => continue,
        };
        let len = u16::from_le_bytes([zip[i + name_len_at], zip[i + name_len_at + 1]]) as usize;
        if zip.get(i + name_at..i + name_at + len) == Some(name) {
            zip[i + size_at..i + size_at + 4].copy_from_slice(&size.to_le_bytes());
            patched += 1;
            assert!(sig == "local" || sig == "central");
        }
    }
    assert_eq!(patched, 2, "{entry}: local header and central directory");
}

fn replaced(name: &str, entry: &str, data: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    let mut all = entries(name);
    let slot = all.iter_mut().find(|(n, _)| n == entry).unwrap();
    slot.1 = data;
    all
}

fn too_large(err: NnError) -> String {
    assert!(matches!(err, NnError::TooLarge { .. }), "{err:?}");
    err.to_string()
}

/// The fixture model's parameter count and its weights limit.
fn mlp_weights_limit() -> (u64, u64) {
    let model = Model::load(&fixture("mlp.json")).unwrap();
    let params = model.param_count() as u64;
    (params, params * WEIGHTS_PER_PARAM + WEIGHTS_OVERHEAD)
}

#[test]
fn oversized_config_json_is_refused() {
    // 17 MiB of JSON whitespace: valid, compresses to a few KiB, too big.
    let big = vec![b' '; 17 * MIB];
    let archive = zip_of(&replaced("mlp.keras", "config.json", big));
    assert!(archive.len() < 4 * MIB);
    let msg = too_large(Model::from_keras_bytes(&archive, "big.keras").unwrap_err());
    assert!(
        msg.starts_with("big.keras: config.json declares 17825792 bytes")
            && msg.contains(&format!("more than the {JSON_LIMIT} bytes allowed")),
        "{msg}"
    );

    // The same, declaring 100 bytes: the read itself stops at the limit.
    let mut lying = archive.clone();
    lie_about_size(&mut lying, "config.json", 100);
    let msg = too_large(Model::from_keras_bytes(&lying, "lying.keras").unwrap_err());
    assert!(
        msg.starts_with("lying.keras: config.json declares 100 bytes but inflates further")
            && msg.contains(&JSON_LIMIT.to_string()),
        "{msg}"
    );
}

#[test]
fn oversized_weights_entry_is_refused() {
    let (params, limit) = mlp_weights_limit();
    // Just past what 235146 parameters may take, all zeros: ~25 KiB deflated.
    let big = vec![0u8; limit as usize + 1];
    let archive = zip_of(&replaced("mlp.keras", "model.weights.h5", big));
    let msg = too_large(Model::from_keras_bytes(&archive, "w.keras").unwrap_err());
    assert!(
        msg.starts_with(&format!(
            "w.keras: model.weights.h5 declares {} bytes, more than the {limit} bytes",
            limit + 1
        )) && msg.contains(&format!("{params} parameters")),
        "{msg}"
    );
    let mut lying = archive.clone();
    lie_about_size(&mut lying, "model.weights.h5", 1000);
    let msg = too_large(Model::from_keras_bytes(&lying, "w.keras").unwrap_err());
    assert!(
        msg.contains("model.weights.h5 declares 1000 bytes but inflates further")
            && msg.contains(&limit.to_string()),
        "{msg}"
    );
    // Model::load reads the archive too, and is bounded the same way.
    let dir = std::env::temp_dir().join(format!("quern-nn-bounded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lying.keras");
    std::fs::write(&path, &lying).unwrap();
    let msg = too_large(Model::load(&path).unwrap_err());
    assert!(msg.contains("lying.keras: model.weights.h5"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn oversized_npz_weights_are_refused() {
    let model = Model::load(&fixture("mlp.json")).unwrap();
    let (_, limit) = mlp_weights_limit();
    // An npz holding one array too large for the model: the arrays are
    // refused before they are decoded, inside a .keras or on their own.
    let npz = zip_of(&[("arr_0.npy".to_string(), vec![0u8; limit as usize + 1])]);
    let msg = too_large(model.params_from_npz_bytes(&npz, "w.npz").unwrap_err());
    assert!(
        msg.starts_with("w.npz: arr_0.npy declares")
            && msg.contains(&format!("more than the {limit} bytes")),
        "{msg}"
    );
    // Two valid arrays, each under the limit, together over it.
    let n = limit as usize / 2 + 1;
    let half = npy::npy_bytes("|u1", &[n], &vec![0u8; n]);
    let npz = zip_of(&[
        ("arr_0.npy".to_string(), half.clone()),
        ("arr_1.npy".to_string(), half),
    ]);
    let msg = too_large(model.params_from_npz_bytes(&npz, "w.npz").unwrap_err());
    assert!(
        msg.starts_with("w.npz: arr_1.npy brings the arrays to")
            && msg.contains(&limit.to_string()),
        "{msg}"
    );
    let mut all = entries("mlp.keras");
    all.push((
        "weights.npz".to_string(),
        zip_of(&[("arr_0.npy".into(), vec![0u8; limit as usize + 1])]),
    ));
    let archive = zip_of(&all);
    let msg = too_large(Model::from_keras_bytes(&archive, "n.keras").unwrap_err());
    assert!(
        msg.starts_with("n.keras: weights.npz: arr_0.npy declares"),
        "{msg}"
    );
}
