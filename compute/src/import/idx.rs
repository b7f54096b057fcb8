//! MNIST-style IDX files (gzipped or not): one file of images, one of labels.

use super::{invalid, ImportError};
use crate::records::{DType, Encoded, RecordLayout};
use std::io::Read;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const TYPE_U8: u8 = 0x08;

struct Idx<'a> {
    dims: Vec<usize>,
    data: &'a [u8],
}

/// Inflates `bytes` when they are gzip, else borrows them.
fn maybe_gunzip<'a>(
    name: &str,
    bytes: &'a [u8],
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], ImportError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(buf)
            .map_err(|e| invalid(name, format!("gzip data is damaged or truncated: {e}")))?;
        Ok(buf)
    } else {
        Ok(bytes)
    }
}

fn parse<'a>(name: &str, bytes: &'a [u8], want_dims: usize) -> Result<Idx<'a>, ImportError> {
    if bytes.len() < 4 {
        return Err(invalid(
            name,
            "too short to be an IDX file (no magic number)",
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(invalid(
            name,
            format!(
                "wrong magic number {:02x}{:02x}{:02x}{:02x}: not an IDX file",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != TYPE_U8 {
        return Err(invalid(
            name,
            format!(
                "element type 0x{:02x} is not supported (only unsigned bytes, 0x08, as in MNIST)",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims != want_dims {
        return Err(invalid(
            name,
            format!(
                "has {ndims} dimensions, expected {want_dims} ({})",
                if want_dims == 1 {
                    "a labels file"
                } else {
                    "an images file: count, rows, columns"
                }
            ),
        ));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(invalid(name, "truncated inside the header"));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| invalid(name, format!("dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(invalid(
            name,
            format!(
                "dimensions {dims:?} need {expected} bytes of data but the file holds {}{}",
                data.len(),
                if data.len() < expected {
                    " (truncated)"
                } else {
                    " (trailing bytes)"
                }
            ),
        ));
    }
    Ok(Idx { dims, data })
}

/// Checks an images file and a labels file and interleaves them into
/// records of `rows x cols x 1` uint8 features and a uint8 label.
pub fn parse_idx(
    images_name: &str,
    images: &[u8],
    labels_name: &str,
    labels: &[u8],
) -> Result<Encoded, ImportError> {
    let (mut ib, mut lb) = (Vec::new(), Vec::new());
    let images = maybe_gunzip(images_name, images, &mut ib)?;
    let labels = maybe_gunzip(labels_name, labels, &mut lb)?;
    let img = parse(images_name, images, 3)?;
    let lab = parse(labels_name, labels, 1)?;
    let (n, rows, cols) = (img.dims[0], img.dims[1], img.dims[2]);
    if lab.dims[0] != n {
        return Err(ImportError::Mismatch(format!(
            "{images_name} holds {n} images but {labels_name} holds {} labels; \
             pass the labels file that belongs to these images",
            lab.dims[0]
        )));
    }
    if n == 0 || rows == 0 || cols == 0 {
        return Err(invalid(
            images_name,
            format!("holds no data ({n} x {rows} x {cols})"),
        ));
    }
    let layout = RecordLayout::new(vec![rows, cols, 1], DType::U8, DType::U8)
        .map_err(|e| invalid(images_name, e.to_string()))?;
    let pixels = rows * cols;
    let mut bytes = Vec::with_capacity(n * layout.record_size());
    let mut classes = 0u32;
    for (i, image) in img.data.chunks_exact(pixels).enumerate() {
        bytes.extend_from_slice(image);
        let label = lab.data[i];
        classes = classes.max(u32::from(label) + 1);
        bytes.push(label);
    }
    Ok(Encoded {
        layout,
        records: n as u64,
        classes,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, TYPE_U8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn interleaves_images_and_labels() {
        let images = idx(&[2, 2, 2], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let labels = idx(&[2], &[9, 4]);
        let e = parse_idx("i", &images, "l", &labels).unwrap();
        assert_eq!(e.bytes, vec![1, 2, 3, 4, 9, 5, 6, 7, 8, 4]);
        assert_eq!(e.classes, 10);
        assert_eq!(e.layout.feature_shape, vec![2, 2, 1]);
    }

    #[test]
    fn gzip_is_detected() {
        use std::io::Write;
        let images = idx(&[1, 1, 3], &[7, 8, 9]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&images).unwrap();
        let gz = gz.finish().unwrap();
        let e = parse_idx("i.gz", &gz, "l", &idx(&[1], &[2])).unwrap();
        assert_eq!(e.bytes, vec![7, 8, 9, 2]);
    }

    #[test]
    fn bad_files_are_named() {
        let labels = idx(&[2], &[1, 2]);
        let truncated = idx(&[2, 2, 2], &[1, 2, 3]);
        let err = parse_idx("imgs", &truncated, "labs", &labels).unwrap_err();
        assert!(err.to_string().contains("imgs") && err.to_string().contains("truncated"));
        let mut wrong = idx(&[2, 2, 2], &[0; 8]);
        wrong[0] = 0x50;
        let err = parse_idx("imgs", &wrong, "labs", &labels).unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
        let err = parse_idx("imgs", &idx(&[3, 1, 1], &[0; 3]), "labs", &labels).unwrap_err();
        assert!(err.to_string().contains("3 images") && err.to_string().contains("2 labels"));
    }
}
