//! The lifeline: heartbeats served on a QUIC endpoint and a thread of their
//! own, as HDFS serves them on its lifeline RPC server.
//!
//! Under a report storm with every client calling as fast as it can, the
//! main endpoint's workers always have work queued; a heartbeat waiting
//! behind it is late, and one late past the dead timeout declares a healthy
//! node dead and starts a storm of copies. Here the heartbeat's packets,
//! connection and handler run on one thread that is idle almost always, so
//! the kernel runs it as soon as a heartbeat arrives. A heartbeat that
//! finds the cluster lock taken (reports hand it on every few hundred
//! chunks) waits for it on a blocking thread, never on this one, which
//! goes on reading packets and finishing other nodes' handshakes.

use crate::service::{heartbeat, request_name, respond, StartError};
use crate::state::State;
use quern_proto::msg::NameRequest;
use quern_proto::tls::Identity;
use quern_proto::transport::{serve, Endpoint, ServerStream, Service, Tuning};
use quern_proto::{ErrorCode, WireError};
use std::net::SocketAddr;
use std::sync::Arc;

/// The file in the namenode's directory with the lifeline's last port.
const PORT_FILE: &str = "lifeline_port";

/// The running lifeline; closing it (or dropping it) ends its thread.
pub(crate) struct Lifeline {
    endpoint: Arc<Endpoint>,
}

impl Lifeline {
    /// Binds `listen` (port 0: the port the last run used, when it is
    /// free, else any) and serves heartbeats for `state` on a new thread;
    /// requests are counted in `main`'s figures.
    pub(crate) fn start(
        state: Arc<State>,
        identity: &Identity,
        listen: SocketAddr,
        main: &Endpoint,
    ) -> Result<Lifeline, StartError> {
        // The same port after a restart lets datanodes find out at once
        // that their connection is to a namenode that is gone (its
        // successor resets it) rather than after QUIC's idle timeout.
        let remembered = state.cfg.dir.join(PORT_FILE);
        let last = std::fs::read_to_string(&remembered)
            .ok()
            .and_then(|p| p.trim().parse::<u16>().ok())
            .filter(|_| listen.port() == 0);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                StartError::Net(quern_proto::Error::io("starting the lifeline's runtime", e))
            })?;
        // Built inside its runtime, so that QUIC's own tasks run there too.
        let endpoint = {
            let _inside = runtime.enter();
            let again = last.and_then(|port| {
                let at = SocketAddr::new(listen.ip(), port);
                Endpoint::server(identity, at, Tuning::tuned())
                    .map_err(|e| {
                        tracing::info!(
                            "lifeline: the last run's port {at} is taken ({e}); using another, \
                             so datanodes notice the restart only at QUIC's idle timeout"
                        )
                    })
                    .ok()
            });
            let endpoint = match again {
                Some(e) => e,
                None => {
                    Endpoint::server(identity, listen, Tuning::tuned()).map_err(StartError::Net)?
                }
            };
            Arc::new(endpoint.counting_with(main))
        };
        let port = endpoint.local_addr().map_err(StartError::Net)?.port();
        if last != Some(port) && listen.port() == 0 {
            if let Err(e) = std::fs::write(&remembered, format!("{port}\n")) {
                tracing::warn!(
                    "cannot remember the lifeline port in {}: {e}; after a restart datanodes \
                     take up to QUIC's idle timeout to notice",
                    remembered.display()
                );
            }
        }
        let serving = endpoint.clone();
        std::thread::Builder::new()
            .name("lifeline".into())
            .spawn(move || {
                runtime.block_on(serve(serving, Arc::new(LifelineService { state })));
            })
            .map_err(|e| {
                StartError::Net(quern_proto::Error::io("starting the lifeline's thread", e))
            })?;
        Ok(Lifeline { endpoint })
    }

    pub(crate) fn port(&self) -> Result<u16, StartError> {
        Ok(self.endpoint.local_addr().map_err(StartError::Net)?.port())
    }

    /// The lifeline's fault rules (for tests), apart from the main
    /// endpoint's.
    pub(crate) fn faults(&self) -> &Arc<quern_proto::fault::Faults> {
        self.endpoint.faults()
    }
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        // No more connections: `serve` returns and the thread ends.
        self.endpoint.close();
    }
}

struct LifelineService {
    state: Arc<State>,
}

impl Service for LifelineService {
    type Request = NameRequest;

    fn role(&self) -> &'static str {
        "namenode lifeline"
    }

    async fn handle(self: Arc<Self>, req: NameRequest, stream: ServerStream) {
        match req {
            NameRequest::Heartbeat(r) => {
                let caller = stream.caller.clone();
                respond(stream, heartbeat(self.state.clone(), &caller, r).await).await
            }
            other => {
                let e = WireError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "the namenode's lifeline port takes heartbeats only, not {}; send it to \
                         the namenode's address",
                        request_name(&other)
                    ),
                );
                respond::<()>(stream, Err(e)).await
            }
        }
    }
}
