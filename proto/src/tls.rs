//! Cluster CA and mutual TLS.
//!
//! `quern cluster init` makes a CA; every node and client presents a
//! certificate signed by it and verifies its peer against it. Certificates
//! name [`crate::SERVER_NAME`] so peers are identified by the CA, not DNS.

use crate::error::{Error, Result};
use crate::identity::{Principal, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A CA certificate and its key, PEM encoded.
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate and key issued by the cluster CA, PEM encoded.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "quern cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

impl ClusterCa {
    pub fn generate() -> Result<ClusterCa> {
        let key = KeyPair::generate().map_err(tls_err)?;
        let cert = ca_params()?.self_signed(&key).map_err(tls_err)?;
        Ok(ClusterCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for `who`, its role written in the
    /// certificate. Servers (namenode, datanodes) may act as TLS server and
    /// client, since datanodes also call each other; admin and user
    /// certificates are for client authentication only.
    pub fn issue(&self, who: &Principal) -> Result<IssuedCert> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(tls_err)?;
        // The issuer is rebuilt from the same fixed parameters as the CA so a
        // CA loaded from disk can sign without parsing its certificate.
        let issuer = Issuer::new(ca_params()?, ca_key);
        let key = KeyPair::generate().map_err(tls_err)?;
        let server = who.role.is_server();
        let dns = if server {
            vec![crate::SERVER_NAME.to_string(), "localhost".into()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(dns).map_err(tls_err)?;
        for uri in who.uris() {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().map_err(tls_err)?));
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("quern {}", who.role));
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let cert = params.signed_by(&key, &issuer).map_err(tls_err)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    pub fn load(dir: &Path) -> Result<ClusterCa> {
        Ok(ClusterCa {
            cert_pem: read_text(&dir.join("ca.pem"))?,
            key_pem: read_text(&dir.join("ca.key"))?,
        })
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

/// The certificate directory of a cluster (`DIR/tls`): `ca.pem` and
/// `ca.key`, and one `NAME.pem` + `NAME.key` per identity (`namenode`,
/// `admin`, `datanode-N`, `user-NAME`).
#[derive(Debug, Clone)]
pub struct ClusterFiles {
    pub dir: PathBuf,
}

impl ClusterFiles {
    /// The files of the cluster directory `dir` (they live in `dir/tls`).
    pub fn in_dir(dir: &Path) -> ClusterFiles {
        Self::in_tls_dir(&dir.join("tls"))
    }

    /// The files inside a certificate directory, whatever its name.
    pub fn in_tls_dir(tls: &Path) -> ClusterFiles {
        ClusterFiles {
            dir: tls.to_path_buf(),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Certificate and key of the identity called `name`.
    pub fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        )
    }

    pub fn exist(&self) -> bool {
        self.ca().exists() && self.cert(NAMENODE).0.exists() && self.cert(ADMIN).0.exists()
    }

    pub fn identity(&self, name: &str) -> Result<Identity> {
        let (cert, key) = self.cert(name);
        Identity::load(&self.ca(), &cert, &key)
    }

    pub fn namenode_identity(&self) -> Result<Identity> {
        self.identity(NAMENODE)
    }

    pub fn admin_identity(&self) -> Result<Identity> {
        self.identity(ADMIN)
    }

    pub fn load_ca(&self) -> Result<ClusterCa> {
        ClusterCa::load(&self.dir)
    }

    /// Issues a certificate for `who` as `NAME.pem`/`NAME.key`, refusing to
    /// replace one that exists (its holder would be locked out).
    pub fn issue(&self, name: &str, who: &Principal) -> Result<Identity> {
        let (cert, key) = self.cert(name);
        if cert.exists() {
            return Err(Error::Config(format!(
                "{} exists already; remove it first to issue a new one",
                cert.display()
            )));
        }
        let issued = self.load_ca()?.issue(who)?;
        write_file(&key, &issued.key_pem, true)?;
        write_file(&cert, &issued.cert_pem, false)?;
        self.identity(name)
    }
}

/// File names of the namenode's and the admin's certificates.
pub const NAMENODE: &str = "namenode";
pub const ADMIN: &str = "admin";
/// The admin certificate's user name: the superuser, and the owner of
/// metadata made before users existed.
pub const ADMIN_USER: &str = "admin";

/// Makes a new CA plus the namenode's and the admin's certificates under
/// `dir/tls`. Refuses to overwrite an existing CA, which would lock every
/// node out.
pub fn init_cluster_dir(dir: &Path) -> Result<ClusterFiles> {
    let files = ClusterFiles::in_dir(dir);
    let tls = &files.dir;
    if tls.join("ca.key").exists() {
        return Err(Error::Config(format!(
            "{} already holds a cluster CA; remove it first to make a new cluster",
            tls.display()
        )));
    }
    std::fs::create_dir_all(tls)
        .map_err(|e| Error::io(format!("creating {}", tls.display()), e))?;
    let ca = ClusterCa::generate()?;
    write_file(&tls.join("ca.pem"), &ca.cert_pem, false)?;
    write_file(&tls.join("ca.key"), &ca.key_pem, true)?;
    files.issue(NAMENODE, &Principal::new(Role::Namenode))?;
    files.issue(ADMIN, &Principal::new(Role::Admin(ADMIN_USER.into())))?;
    Ok(files)
}

fn write_file(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// What a node or client presents and trusts.
#[derive(Clone)]
pub struct Identity {
    pub ca: Vec<CertificateDer<'static>>,
    /// `None` only for a client that presents no certificate (which every
    /// quern server refuses; kept so that refusal can be tested).
    pub cert: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    /// Session tickets of every server endpoint built from this identity
    /// (and its clones): a client that connected to one (a datanode
    /// registering at the namenode) resumes its session at the other (the
    /// namenode's lifeline) without a certificate signed and two verified
    /// again. No other server can read them.
    tickets: Arc<std::sync::OnceLock<Arc<dyn rustls::server::ProducesTickets>>>,
}

impl Identity {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Identity> {
        let ca_certs = load_certs(ca)?;
        let certs = load_certs(cert)?;
        let key_bytes = std::fs::read(key)
            .map_err(|e| Error::io(format!("reading key {}", key.display()), e))?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| Error::Tls(format!("{}: not a PEM private key ({e})", key.display())))?;
        Ok(Identity {
            ca: ca_certs,
            cert: Some((certs, Arc::new(key))),
            tickets: Arc::default(),
        })
    }

    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Identity> {
        let parse = |pem: &str| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(tls_err)
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(tls_err)?;
        Ok(Identity {
            ca: parse(ca_pem)?,
            cert: Some((parse(cert_pem)?, Arc::new(key))),
            tickets: Arc::default(),
        })
    }

    /// The role written in this identity's own certificate.
    pub fn principal(&self) -> Result<Principal> {
        let (certs, _) = self
            .cert
            .as_ref()
            .ok_or_else(|| Error::Tls("no certificate".into()))?;
        let first = certs
            .first()
            .ok_or_else(|| Error::Tls("empty certificate chain".into()))?;
        Principal::from_cert(first)
    }

    pub fn without_certificate(self) -> Identity {
        Identity {
            ca: self.ca,
            cert: None,
            tickets: Arc::default(),
        }
    }

    fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(tls_err)?;
        }
        Ok(roots)
    }

    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(tls_err)?;
        let (certs, key) = self
            .cert
            .as_ref()
            .ok_or_else(|| Error::Tls("a server needs a certificate".into()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(tls_err)?;
        cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
        cfg.ticketer = match self.tickets.get() {
            Some(t) => t.clone(),
            None => {
                let made = rustls::crypto::ring::Ticketer::new().map_err(tls_err)?;
                self.tickets.get_or_init(|| made).clone()
            }
        };
        Ok(cfg)
    }

    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(self.roots()?);
        let mut cfg = match &self.cert {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(tls_err)?,
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
        Ok(cfg)
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading certificate {}", path.display()), e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: not a PEM certificate ({e})", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_loadable_identities_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let files = init_cluster_dir(dir.path()).unwrap();
        let node = files.namenode_identity().unwrap();
        node.server_config().unwrap();
        assert_eq!(node.principal().unwrap().role, Role::Namenode);
        let admin = files.admin_identity().unwrap();
        admin.client_config().unwrap();
        assert_eq!(admin.principal().unwrap().role, Role::Admin("admin".into()));
        let user = Principal {
            role: Role::User("alice".into()),
            groups: vec!["ml".into()],
        };
        let alice = files.issue("user-alice", &user).unwrap();
        assert_eq!(alice.principal().unwrap(), user);
        assert!(files.issue("user-alice", &user).is_err());
        let err = init_cluster_dir(dir.path()).err().unwrap();
        assert!(err.to_string().contains("already holds a cluster CA"));
    }
}
