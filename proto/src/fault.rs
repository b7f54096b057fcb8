//! Fault filters, TiKV's shape: rules an endpoint consults for every
//! request it sends or serves, so tests make a peer slow, stuck, lossy or
//! unreachable inside one process instead of killing processes and
//! sleeping through real timeouts. An endpoint without rules pays one
//! uncontended lock per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What happens to a matching request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request is swallowed: no answer ever comes (the caller's
    /// deadline decides).
    Drop,
    /// The request waits this long before it goes on.
    Delay(Duration),
    /// The body (chunk bytes, parameters) stops flowing after this many
    /// bytes, while the connection stays up: a hung disk, a full queue.
    Stall { after: u64 },
    /// One bit of the body is flipped on the way.
    Corrupt,
}

/// Which side of an exchange a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Requests this endpoint sends (and bodies it sends with them).
    Outgoing,
    /// Requests this endpoint serves (and bodies it sends back).
    Incoming,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub direction: Direction,
    /// The other side's address; `None` for every peer.
    pub peer: Option<SocketAddr>,
    /// The request kind (`"ReadChunk"`, `"Heartbeat"`); `None` for all.
    pub kind: Option<&'static str>,
    pub fault: Fault,
}

impl Rule {
    /// Everything to and from `peer` is lost: a network partition.
    pub fn partition(peer: SocketAddr) -> [Rule; 2] {
        [Direction::Outgoing, Direction::Incoming].map(|direction| Rule {
            direction,
            peer: Some(peer),
            kind: None,
            fault: Fault::Drop,
        })
    }

    fn matches(&self, direction: Direction, peer: SocketAddr, kind: &str) -> bool {
        self.direction == direction
            && self.peer.is_none_or(|p| p == peer)
            && self.kind.is_none_or(|k| k == kind)
    }
}

/// The rules of one endpoint.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<(u64, Rule)>>,
    next: AtomicU64,
}

impl Faults {
    /// Adds a rule; the id removes it again.
    pub fn add(&self, rule: Rule) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().push((id, rule));
        id
    }

    pub fn remove(&self, id: u64) {
        self.lock().retain(|(i, _)| *i != id);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The first rule that applies, if any.
    pub fn find(&self, direction: Direction, peer: SocketAddr, kind: &str) -> Option<Fault> {
        let rules = self.lock();
        if rules.is_empty() {
            return None;
        }
        rules
            .iter()
            .find(|(_, r)| r.matches(direction, peer, kind))
            .map(|(_, r)| r.fault)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Rule)>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Applies a request-level fault before the request goes on: waits out a
/// delay, or never returns for a dropped request.
pub async fn before_request(fault: Option<Fault>) {
    match fault {
        Some(Fault::Drop) => std::future::pending::<()>().await,
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        _ => {}
    }
}

/// Body-level faults on a stream of pieces: how many bytes passed, and
/// what to do with the next piece.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyFault {
    fault: Option<Fault>,
    passed: u64,
    corrupted: bool,
}

impl BodyFault {
    pub fn new(fault: Option<Fault>) -> BodyFault {
        BodyFault {
            fault,
            ..Default::default()
        }
    }

    /// Counts `n` bytes taken in, or never returns once the stream is
    /// stalled (a receiver that stops reading).
    pub async fn take(&mut self, n: u64) {
        if let Some(Fault::Stall { after }) = self.fault {
            if self.passed + n > after {
                std::future::pending::<()>().await;
            }
        }
        self.passed += n;
    }

    /// Lets `piece` through (perhaps damaged), or never returns once the
    /// stream is stalled.
    pub async fn pass(&mut self, piece: bytes::Bytes) -> bytes::Bytes {
        match self.fault {
            Some(Fault::Stall { after }) if self.passed + piece.len() as u64 > after => {
                std::future::pending::<()>().await;
                piece
            }
            Some(Fault::Corrupt) if !self.corrupted && !piece.is_empty() => {
                self.corrupted = true;
                self.passed += piece.len() as u64;
                let mut v = piece.to_vec();
                v[0] ^= 1;
                bytes::Bytes::from(v)
            }
            _ => {
                self.passed += piece.len() as u64;
                piece
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_by_direction_peer_and_kind() {
        let f = Faults::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        assert_eq!(f.find(Direction::Outgoing, a, "Stat"), None);
        let id = f.add(Rule {
            direction: Direction::Incoming,
            peer: Some(a),
            kind: Some("ReadChunk"),
            fault: Fault::Stall { after: 10 },
        });
        assert_eq!(f.find(Direction::Outgoing, a, "ReadChunk"), None);
        assert_eq!(f.find(Direction::Incoming, b, "ReadChunk"), None);
        assert_eq!(f.find(Direction::Incoming, a, "Stat"), None);
        assert_eq!(
            f.find(Direction::Incoming, a, "ReadChunk"),
            Some(Fault::Stall { after: 10 })
        );
        f.remove(id);
        assert_eq!(f.find(Direction::Incoming, a, "ReadChunk"), None);
        for r in Rule::partition(b) {
            f.add(r);
        }
        assert_eq!(
            f.find(Direction::Outgoing, b, "Heartbeat"),
            Some(Fault::Drop)
        );
        assert_eq!(f.find(Direction::Incoming, b, "Stat"), Some(Fault::Drop));
    }

    #[tokio::test]
    async fn bodies_stall_after_their_bytes_and_corrupt_once() {
        let mut c = BodyFault::new(Some(Fault::Corrupt));
        let p = c.pass(bytes::Bytes::from_static(&[0, 0])).await;
        assert_eq!(&p[..], &[1, 0]);
        let p = c.pass(bytes::Bytes::from_static(&[0, 0])).await;
        assert_eq!(&p[..], &[0, 0]);
        let mut s = BodyFault::new(Some(Fault::Stall { after: 3 }));
        s.pass(bytes::Bytes::from_static(&[0, 0])).await;
        let stuck = tokio::time::timeout(
            Duration::from_millis(50),
            s.pass(bytes::Bytes::from_static(&[0, 0])),
        )
        .await;
        assert!(stuck.is_err(), "the third byte must not pass");
    }
}
