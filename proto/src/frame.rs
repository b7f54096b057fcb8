//! Length-prefixed frames on a byte stream (a QUIC stream in practice).
//!
//! A frame is a big-endian `u32` length followed by that many bytes of
//! bincode. The length is checked against the limit before anything is
//! allocated, and bincode itself is given the same limit so a hostile
//! length prefix inside the payload cannot make us allocate either.

use crate::error::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest control message accepted. Bulk chunk bytes do not travel in
/// frames; they follow a header frame as a raw byte run of declared length.
pub const MAX_FRAME: usize = 16 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let mut out = vec![0u8; 4];
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| Error::Malformed(format!("cannot encode message: {e}")))?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME as u64,
        });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| Error::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(Error::Malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(msg)?;
    w.write_all(&bytes)
        .await
        .map_err(|e| Error::io("writing a frame", e))
}

/// Reads one frame; `Ok(None)` at a clean end of stream before any byte.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r
            .read(&mut len[got..])
            .await
            .map_err(|e| Error::io("reading a frame header", e))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(Error::Malformed(
                "stream ended inside a frame header".into(),
            ));
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME as u64,
        });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Malformed(format!("stream ended inside a frame of {len} bytes"))
        } else {
            Error::io("reading a frame", e)
        }
    })?;
    decode(&buf).map(Some)
}

/// Reads one frame that must be there.
pub async fn expect_frame<R, T>(r: &mut R) -> Result<T>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame(r)
        .await?
        .ok_or_else(|| Error::Malformed("stream ended before the expected message".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_rejects_oversized_before_allocating() {
        let msg = (42u64, "hello".to_string(), vec![1u8, 2, 3]);
        let bytes = encode(&msg).unwrap();
        let mut r = &bytes[..];
        let back: (u64, String, Vec<u8>) = expect_frame(&mut r).await.unwrap();
        assert_eq!(back, msg);

        let mut huge = (u32::MAX).to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        let mut r = &huge[..];
        let err = read_frame::<_, u64>(&mut r).await.unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn rejects_garbage_and_truncation() {
        // A Vec claiming 2^60 elements inside a small frame must not allocate.
        let mut payload = vec![0u8; 4];
        payload.extend_from_slice(&[0xFD, 0, 0, 0, 0, 0, 0, 0, 0x10]);
        let len = (payload.len() - 4) as u32;
        payload[..4].copy_from_slice(&len.to_be_bytes());
        let mut r = &payload[..];
        assert!(matches!(
            read_frame::<_, Vec<u64>>(&mut r).await,
            Err(Error::Malformed(_))
        ));

        let bytes = encode(&"some text".to_string()).unwrap();
        let mut r = &bytes[..bytes.len() - 2];
        let err = read_frame::<_, String>(&mut r).await.unwrap_err();
        assert!(err.to_string().contains("stream ended"), "{err}");
    }
}
