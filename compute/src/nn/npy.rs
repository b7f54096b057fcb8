//! NumPy `.npy` and `.npz` reading and writing, enough for weights, inputs,
//! outputs and labels. Written here rather than taken from a crate so that it
//! follows whatever ndarray version the workspace uses and so that every
//! error names the array at fault.

use std::io::{Cursor, Read, Write};
use std::path::Path;

use ndarray::{ArrayD, ArrayViewD, IxDyn, ShapeBuilder};

use super::error::{NnError, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Element types we accept in files; everything numeric converts to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    fn parse(descr: &str) -> Option<Dtype> {
        let (order, code) = match descr.as_bytes().first()? {
            b'<' | b'|' | b'=' => (true, &descr[1..]),
            b'>' => (false, &descr[1..]),
            _ => (true, descr),
        };
        let single_byte = matches!(code, "i1" | "u1" | "b1");
        if !order && !single_byte {
            // Big-endian arrays are rare enough that refusing them is fine.
            return None;
        }
        Some(match code {
            "f4" => Dtype::F32,
            "f8" => Dtype::F64,
            "i8" => Dtype::I64,
            "i4" => Dtype::I32,
            "i2" => Dtype::I16,
            "i1" => Dtype::I8,
            "u8" => Dtype::U64,
            "u4" => Dtype::U32,
            "u2" => Dtype::U16,
            "u1" => Dtype::U8,
            "b1" => Dtype::Bool,
            _ => return None,
        })
    }

    fn read(self, b: &[u8]) -> f64 {
        let a8 = |b: &[u8]| -> [u8; 8] {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            a
        };
        let a4 = |b: &[u8]| -> [u8; 4] {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[..4]);
            a
        };
        match self {
            Dtype::F32 => f32::from_le_bytes(a4(b)) as f64,
            Dtype::F64 => f64::from_le_bytes(a8(b)),
            Dtype::I64 => i64::from_le_bytes(a8(b)) as f64,
            Dtype::U64 => u64::from_le_bytes(a8(b)) as f64,
            Dtype::I32 => i32::from_le_bytes(a4(b)) as f64,
            Dtype::U32 => u32::from_le_bytes(a4(b)) as f64,
            Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Dtype::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            Dtype::I8 => b[0] as i8 as f64,
            Dtype::U8 | Dtype::Bool => b[0] as f64,
        }
    }
}

struct Header {
    dtype: Dtype,
    fortran: bool,
    shape: Vec<usize>,
    data_start: usize,
}

fn parse_header(bytes: &[u8], name: &str) -> Result<Header> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NnError::array(name, "not a .npy array (bad magic)"));
    }
    let major = bytes[6];
    let (len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(NnError::array(name, "truncated .npy header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => {
            return Err(NnError::array(
                name,
                format!("unsupported .npy version {v}"),
            ))
        }
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| NnError::array(name, "truncated .npy header"))?;
    let text = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| NnError::array(name, "the .npy header is not text"))?;
    let descr = dict_value(text, "descr")
        .and_then(|v| v.strip_prefix('\'').or_else(|| v.strip_prefix('"')))
        .and_then(|v| v.split(['\'', '"']).next())
        .ok_or_else(|| NnError::array(name, "the .npy header has no 'descr'"))?;
    let dtype = Dtype::parse(descr).ok_or_else(|| {
        NnError::array(
            name,
            format!("unsupported dtype '{descr}' (expected float32, float64 or integers)"),
        )
    })?;
    let fortran = dict_value(text, "fortran_order")
        .map(|v| v.starts_with("True"))
        .unwrap_or(false);
    let shape_text = dict_value(text, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| NnError::array(name, "the .npy header has no 'shape'"))?;
    let mut shape = Vec::new();
    for part in shape_text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let d = part
            .trim_end_matches('L')
            .parse::<usize>()
            .map_err(|_| NnError::array(name, format!("bad dimension '{part}' in shape")))?;
        shape.push(d);
    }
    Ok(Header {
        dtype,
        fortran,
        shape,
        data_start: end,
    })
}

/// The text after `'key':` in a Python dict literal.
fn dict_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let single = format!("'{key}'");
    let double = format!("\"{key}\"");
    let pos = text
        .find(&single)
        .map(|p| p + single.len())
        .or_else(|| text.find(&double).map(|p| p + double.len()))?;
    let rest = text[pos..].trim_start().strip_prefix(':')?;
    Some(rest.trim_start())
}

struct Raw<'a> {
    header: Header,
    data: &'a [u8],
}

fn parse_raw<'a>(bytes: &'a [u8], name: &str) -> Result<Raw<'a>> {
    let header = parse_header(bytes, name)?;
    let count = header
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| NnError::array(name, "shape too large"))?;
    let need = count
        .checked_mul(header.dtype.size())
        .ok_or_else(|| NnError::array(name, "shape too large"))?;
    let data = &bytes[header.data_start..];
    if data.len() < need {
        return Err(NnError::array(
            name,
            format!(
                "truncated data: shape {} needs {need} bytes, file has {}",
                shape_str(&header.shape),
                data.len()
            ),
        ));
    }
    Ok(Raw {
        data: &data[..need],
        header,
    })
}

/// Reads a `.npy` array of any numeric dtype as f32 in standard (C) layout.
pub fn npy_to_array(bytes: &[u8], name: &str) -> Result<ArrayD<f32>> {
    let raw = parse_raw(bytes, name)?;
    let h = &raw.header;
    let values: Vec<f32> = if h.dtype == Dtype::F32 {
        raw.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        raw.data
            .chunks_exact(h.dtype.size())
            .map(|c| h.dtype.read(c) as f32)
            .collect()
    };
    let shape = IxDyn(&h.shape);
    let arr = if h.fortran {
        ArrayD::from_shape_vec(shape.f(), values)
    } else {
        ArrayD::from_shape_vec(shape, values)
    }
    .map_err(|e| NnError::array(name, e.to_string()))?;
    Ok(if h.fortran {
        arr.as_standard_layout().into_owned()
    } else {
        arr
    })
}

/// Reads integer class labels (any integer dtype, or floats holding whole
/// numbers) as a flat list.
pub fn npy_to_labels(bytes: &[u8], name: &str) -> Result<Vec<u32>> {
    let raw = parse_raw(bytes, name)?;
    let h = &raw.header;
    let mut out = Vec::with_capacity(raw.data.len() / h.dtype.size());
    for (i, c) in raw.data.chunks_exact(h.dtype.size()).enumerate() {
        let v = h.dtype.read(c);
        // NaN fails the fract test too.
        if v < 0.0 || v.fract() != 0.0 || v > u32::MAX as f64 {
            return Err(NnError::array(
                name,
                format!("label {i} is {v}, not a class index"),
            ));
        }
        out.push(v as u32);
    }
    Ok(out)
}

/// Encodes an f32 array as `.npy` (version 1.0, little-endian, C order).
pub fn array_to_npy(arr: &ArrayViewD<'_, f32>) -> Vec<u8> {
    let mut data = Vec::with_capacity(arr.len() * 4);
    for v in arr.iter() {
        data.extend_from_slice(&v.to_le_bytes());
    }
    npy_bytes("<f4", arr.shape(), &data)
}

/// An `.npy` file (version 1.0, C order) around raw little-endian values
/// of the numpy type `descr` (`<f4`, `|u1`, `<u4`, ...).
pub fn npy_bytes(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}",
        shape_str(shape)
    );
    // numpy pads the header so the data starts on a 64-byte boundary.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

pub(crate) fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

/// Most bytes reserved up front for a zip entry. Reserving its declared
/// size saves regrowing for real files, but a declared size can lie; past
/// this the buffer grows only with what actually inflates.
const MAX_PREALLOC: u64 = 256 << 20;

/// Reads the zip entry `file` whole, refusing it when it declares, or
/// actually inflates to, more than `limit` bytes. The declared size is
/// checked first so nothing is allocated for an entry that admits to being
/// too big; the read is bounded as well because a crafted archive can
/// declare a small size and inflate without end (the zip crate compares
/// the CRC only at the end, after everything was inflated). `what` names
/// the archive and `why` says where the limit comes from, for the error;
/// `unreadable` makes the error for a read that fails (damaged data, bad
/// CRC) from the entry's name, so each caller keeps its own wording.
pub(crate) fn read_entry_bounded<R: Read>(
    mut file: zip::read::ZipFile<'_, R>,
    what: &str,
    limit: u64,
    why: &str,
    unreadable: impl FnOnce(&str, std::io::Error) -> NnError,
) -> Result<Vec<u8>> {
    let entry = file.name().to_string();
    let too_large = |size: String| NnError::TooLarge {
        what: what.to_string(),
        entry: entry.clone(),
        size,
        limit,
        why: why.to_string(),
    };
    let declared = file.size();
    if declared > limit {
        return Err(too_large(format!("declares {declared} bytes")));
    }
    // Within the limit, so within memory we accept to spend.
    let mut buf = Vec::with_capacity(declared.min(MAX_PREALLOC) as usize);
    // One byte past the limit is enough to know the entry is too big.
    (&mut file)
        .take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| unreadable(&entry, e))?;
    if buf.len() as u64 > limit {
        return Err(too_large(format!(
            "declares {declared} bytes but inflates further"
        )));
    }
    Ok(buf)
}

/// Reads every array of an `.npz` archive, in archive order, with the
/// `.npy` suffix taken off the names.
pub fn npz_to_arrays(bytes: &[u8], what: &str) -> Result<Vec<(String, ArrayD<f32>)>> {
    npz_to_arrays_bounded(bytes, what, u64::MAX, "")
}

/// [`npz_to_arrays`], refusing an archive whose entries together hold more
/// than `limit` bytes (each entry is refused before it inflates past it);
/// `why` says where the limit comes from, for the error.
pub(crate) fn npz_to_arrays_bounded(
    bytes: &[u8],
    what: &str,
    limit: u64,
    why: &str,
) -> Result<Vec<(String, ArrayD<f32>)>> {
    let zerr = |e: zip::result::ZipError| NnError::Zip {
        what: what.to_string(),
        message: e.to_string(),
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(zerr)?;
    let mut out = Vec::with_capacity(archive.len());
    let mut total = 0u64;
    for i in 0..archive.len() {
        let file = archive.by_index(i).map_err(zerr)?;
        let entry = file.name().to_string();
        let name = entry.strip_suffix(".npy").unwrap_or(&entry).to_string();
        let buf = read_entry_bounded(file, what, limit, why, |_, e| {
            NnError::array(&format!("{what}: {name}"), e.to_string())
        })?;
        total = total.saturating_add(buf.len() as u64);
        if total > limit {
            return Err(NnError::TooLarge {
                what: what.to_string(),
                entry,
                size: format!("brings the arrays to {total} bytes"),
                limit,
                why: why.to_string(),
            });
        }
        let arr = npy_to_array(&buf, &format!("{what}: array {name}"))?;
        out.push((name, arr));
    }
    Ok(out)
}

/// Writes arrays into an uncompressed `.npz` (what `np.savez` makes).
pub fn arrays_to_npz(arrays: &[(String, ArrayViewD<'_, f32>)]) -> Result<Vec<u8>> {
    let zerr = |e: zip::result::ZipError| NnError::Zip {
        what: "npz".to_string(),
        message: e.to_string(),
    };
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(false);
    for (name, arr) in arrays {
        w.start_file(format!("{name}.npy"), opts).map_err(zerr)?;
        w.write_all(&array_to_npy(arr))
            .map_err(|e| NnError::array(name, e.to_string()))?;
    }
    Ok(w.finish().map_err(zerr)?.into_inner())
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| NnError::io(path, e))
}

/// Loads a `.npy` file as f32.
pub fn load_npy(path: &Path) -> Result<ArrayD<f32>> {
    let bytes = read_file(path)?;
    npy_to_array(&bytes, &path.display().to_string())
}

/// Loads a `.npy` file of integer labels.
pub fn load_labels(path: &Path) -> Result<Vec<u32>> {
    let bytes = read_file(path)?;
    npy_to_labels(&bytes, &path.display().to_string())
}

/// Saves an f32 array as `.npy`.
pub fn save_npy(path: &Path, arr: &ArrayViewD<'_, f32>) -> Result<()> {
    std::fs::write(path, array_to_npy(arr)).map_err(|e| NnError::io(path, e))
}

/// Loads every array of an `.npz` file.
pub fn load_npz(path: &Path) -> Result<Vec<(String, ArrayD<f32>)>> {
    let bytes = read_file(path)?;
    npz_to_arrays(&bytes, &path.display().to_string())
}
