//! MNIST-style IDX files (gzipped or not): one file of images, one of labels.
//!
//! A gzipped file is inflated only as far as its own header promises: the
//! header is read from the decompressed stream first, and then exactly the
//! bytes its dimensions need, so a small gzip that inflates to gigabytes is
//! refused after a few bytes more than promised rather than exhausting
//! memory.

use super::{invalid, ImportError};
use crate::records::{DType, Encoded, RecordLayout};
use std::borrow::Cow;
use std::io::Read;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const TYPE_U8: u8 = 0x08;

/// Most data bytes an IDX header may promise. Real IDX datasets are tens of
/// MiB (MNIST, Fashion-MNIST) to under a GiB (EMNIST); the importer holds
/// the file and the interleaved records in memory anyway, so a header
/// promising more is a damaged file or an attempt to make us allocate.
const MAX_IDX_DATA: u64 = 16 << 30;

/// Most bytes reserved up front for inflated data. Reserving what the header
/// promises saves regrowing for real files, but a lying header on a tiny
/// gzip must not commit gigabytes before a byte of data has arrived; past
/// this the buffer grows with what actually inflates.
const MAX_PREALLOC: usize = 256 << 20;

struct Idx<'a> {
    dims: Vec<usize>,
    data: Cow<'a, [u8]>,
}

/// An IDX header: the dimensions and how many data bytes they need.
struct Header {
    dims: Vec<usize>,
    /// Header bytes (magic and dimensions).
    len: usize,
    /// Data bytes the dimensions need.
    data: usize,
}

/// Reads into `buf` until it is full or the input ends; returns how much
/// was read. Read errors can only come from gzip (a slice never fails).
fn fill(name: &str, input: &mut impl Read, buf: &mut [u8]) -> Result<usize, ImportError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(damaged(name, e)),
        }
    }
    Ok(got)
}

fn damaged(name: &str, e: std::io::Error) -> ImportError {
    invalid(name, format!("gzip data is damaged or truncated: {e}"))
}

/// Reads and checks the magic number and dimensions from the start of
/// `input` (the file, or its inflated stream), leaving `input` at the data.
fn read_header(name: &str, input: &mut impl Read, want_dims: usize) -> Result<Header, ImportError> {
    let mut magic = [0u8; 4];
    if fill(name, input, &mut magic)? < magic.len() {
        return Err(invalid(
            name,
            "too short to be an IDX file (no magic number)",
        ));
    }
    if magic[0] != 0 || magic[1] != 0 {
        return Err(invalid(
            name,
            format!(
                "wrong magic number {:02x}{:02x}{:02x}{:02x}: not an IDX file",
                magic[0], magic[1], magic[2], magic[3]
            ),
        ));
    }
    if magic[2] != TYPE_U8 {
        return Err(invalid(
            name,
            format!(
                "element type 0x{:02x} is not supported (only unsigned bytes, 0x08, as in MNIST)",
                magic[2]
            ),
        ));
    }
    let ndims = magic[3] as usize;
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
    // At most 255 dimensions of 4 bytes: a small, fixed-size read.
    let mut raw = vec![0u8; 4 * ndims];
    if fill(name, input, &mut raw)? < raw.len() {
        return Err(invalid(name, "truncated inside the header"));
    }
    let dims: Vec<usize> = raw
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let data = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| invalid(name, format!("dimensions {dims:?} overflow")))?;
    if data as u64 > MAX_IDX_DATA {
        return Err(invalid(
            name,
            format!(
                "dimensions {dims:?} promise {data} bytes of data, more than the \
                 {MAX_IDX_DATA} an IDX import accepts: not an IDX file, or a damaged one"
            ),
        ));
    }
    Ok(Header {
        dims,
        len: magic.len() + raw.len(),
        data,
    })
}

fn size_mismatch(name: &str, h: &Header, held: usize) -> ImportError {
    invalid(
        name,
        format!(
            "dimensions {:?} need {} bytes of data but the file holds {held}{}",
            h.dims,
            h.data,
            if held < h.data {
                " (truncated)"
            } else {
                " (trailing bytes)"
            }
        ),
    )
}

/// Inflates the data after a gzipped file's header, refusing to go one byte
/// past what the header promised.
fn inflate_data(name: &str, gz: &mut impl Read, h: &Header) -> Result<Vec<u8>, ImportError> {
    let mut data = Vec::with_capacity(h.data.min(MAX_PREALLOC));
    // One byte more than promised is enough to know the stream lies; reading
    // to its end could mean inflating gigabytes.
    gz.take(h.data as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| damaged(name, e))?;
    if data.len() > h.data {
        return Err(invalid(
            name,
            format!(
                "inflates past the {} bytes its header promises (dimensions {:?}): \
                 not an IDX file, or a gzip bomb; nothing was stored",
                h.len + h.data,
                h.dims
            ),
        ));
    }
    if data.len() < h.data {
        return Err(size_mismatch(name, h, data.len()));
    }
    Ok(data)
}

/// Checks an IDX file (gzipped or not) of `want_dims` dimensions and
/// returns its dimensions and data, inflated or borrowed.
fn parse<'a>(name: &str, bytes: &'a [u8], want_dims: usize) -> Result<Idx<'a>, ImportError> {
    if bytes.starts_with(&GZIP_MAGIC) {
        let mut gz = flate2::read::GzDecoder::new(bytes);
        let h = read_header(name, &mut gz, want_dims)?;
        let data = inflate_data(name, &mut gz, &h)?;
        Ok(Idx {
            dims: h.dims,
            data: Cow::Owned(data),
        })
    } else {
        let mut rest = bytes;
        let h = read_header(name, &mut rest, want_dims)?;
        if rest.len() != h.data {
            return Err(size_mismatch(name, &h, rest.len()));
        }
        Ok(Idx {
            dims: h.dims,
            data: Cow::Borrowed(rest),
        })
    }
}

/// Checks an images file and a labels file and interleaves them into
/// records of `rows x cols x 1` uint8 features and a uint8 label.
pub fn parse_idx(
    images_name: &str,
    images: &[u8],
    labels_name: &str,
    labels: &[u8],
) -> Result<Encoded, ImportError> {
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

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn gzip_inflating_past_its_header_is_refused() {
        // 8 promised bytes, then 64 MiB of zeros that compress to ~64 KiB.
        let mut bomb = idx(&[2, 2, 2], &[1; 8]);
        bomb.resize(bomb.len() + (64 << 20), 0);
        let bomb = gzip(&bomb);
        let labels = idx(&[2], &[1, 2]);
        let msg = parse_idx("bomb.gz", &bomb, "labs", &labels)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("bomb.gz: ")
                && msg.contains("inflates past the 24 bytes its header promises")
                && msg.contains("gzip bomb")
                && msg.contains("nothing was stored"),
            "{msg}"
        );
        // One trailing byte is as much a lie as 64 MiB of them.
        let one_more = gzip(&idx(&[2, 2, 2], &[1; 9]));
        let msg = parse_idx("i.gz", &one_more, "labs", &labels)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("inflates past the 24 bytes"), "{msg}");
        // The labels file is bounded the same way.
        let mut labels_bomb = idx(&[2], &[1, 2]);
        labels_bomb.resize(labels_bomb.len() + 4096, 0);
        let msg = parse_idx("i", &idx(&[2, 2, 2], &[1; 8]), "l.gz", &gzip(&labels_bomb))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("l.gz: inflates past the 10 bytes"), "{msg}");
    }

    #[test]
    fn gzip_shorter_than_its_header_promises_is_truncated() {
        let short = gzip(&idx(&[2, 2, 2], &[1; 7]));
        let msg = parse_idx("short.gz", &short, "l", &idx(&[2], &[1, 2]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("short.gz: ")
                && msg.contains("need 8 bytes")
                && msg.contains("truncated"),
            "{msg}"
        );
        let header_only = gzip(&[0, 0, TYPE_U8, 3, 0, 0]);
        let msg = parse_idx("h.gz", &header_only, "l", &idx(&[2], &[1, 2]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("h.gz") && msg.contains("truncated inside the header"),
            "{msg}"
        );
        // A cut gzip stream (no trailer) is damaged, not silently short.
        let full = gzip(&idx(&[2, 2, 2], &[1; 8]));
        let msg = parse_idx("cut.gz", &full[..full.len() - 6], "l", &idx(&[2], &[1, 2]))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("cut.gz") && msg.contains("damaged or truncated"),
            "{msg}"
        );
    }

    #[test]
    fn headers_promising_too_much_are_refused_before_inflating() {
        let labels = idx(&[2], &[1, 2]);
        // 2^48 bytes: past the limit, though it fits in a usize.
        let huge = gzip(&idx(&[1 << 16, 1 << 16, 1 << 16], &[0; 16]));
        let msg = parse_idx("huge.gz", &huge, "l", &labels)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("huge.gz: ")
                && msg.contains("[65536, 65536, 65536]")
                && msg.contains(&MAX_IDX_DATA.to_string()),
            "{msg}"
        );
        let max = u32::MAX;
        let msg = parse_idx("ovf", &idx(&[max, max, max], &[]), "l", &labels)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("ovf") && msg.contains("overflow"), "{msg}");
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
