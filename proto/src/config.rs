//! Client configuration: which namenode, which certificates.

use crate::error::{Error, Result};
use crate::tls::Identity;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `client.toml`. Relative certificate paths are relative to the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub namenode: SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Seconds an RPC may take before it fails (default 30).
    #[serde(default)]
    pub rpc_timeout_secs: Option<u64>,
    /// Seconds a transfer may go without a piece moving before the peer
    /// counts as stuck (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub piece_idle_secs: Option<u64>,
    /// Milliseconds without progress before a read also starts on the next
    /// replica (default: adaptive, 30 ms to 1 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge_after_ms: Option<u64>,
}

impl ClientConfig {
    pub const ENV: &'static str = "QUERN_CONFIG";

    /// A configuration acting as the identity `name` of a cluster's
    /// certificate directory, with every setting at its default.
    pub fn for_identity(
        namenode: SocketAddr,
        files: &crate::tls::ClusterFiles,
        name: &str,
    ) -> ClientConfig {
        let (cert, key) = files.cert(name);
        ClientConfig {
            namenode,
            ca: files.ca(),
            cert,
            key,
            rpc_timeout_secs: None,
            piece_idle_secs: None,
            hedge_after_ms: None,
        }
    }

    /// `--config FILE`, else `$QUERN_CONFIG`, else `~/.config/quern/client.toml`.
    pub fn discover(explicit: Option<&Path>) -> Result<ClientConfig> {
        if let Some(p) = explicit {
            return ClientConfig::load(p);
        }
        if let Some(p) = std::env::var_os(Self::ENV).filter(|v| !v.is_empty()) {
            return ClientConfig::load(Path::new(&p));
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = Path::new(&home).join(".config/quern/client.toml");
            if p.exists() {
                return ClientConfig::load(&p);
            }
        }
        Err(Error::Config(
            "no client configuration: pass --config FILE, set QUERN_CONFIG, or create \
             ~/.config/quern/client.toml (`quern cluster up` writes one)"
                .into(),
        ))
    }

    pub fn load(path: &Path) -> Result<ClientConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::io(
                format!("reading client configuration {}", path.display()),
                e,
            )
        })?;
        let mut cfg: ClientConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.ca, &mut cfg.cert, &mut cfg.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string(self).map_err(|e| Error::Config(e.to_string()))?;
        std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// The transport settings this configuration asks for.
    pub fn tuning(&self) -> crate::transport::Tuning {
        let mut t = crate::transport::Tuning::tuned();
        if let Some(s) = self.piece_idle_secs {
            t.piece_idle = std::time::Duration::from_secs(s.max(1));
        }
        if let Some(ms) = self.hedge_after_ms {
            t.hedge_after = Some(std::time::Duration::from_millis(ms));
        }
        t
    }

    pub fn identity(&self) -> Result<Identity> {
        Identity::load(&self.ca, &self.cert, &self.key)
    }
}
