//! Who a certificate says its holder is.
//!
//! Every certificate the cluster CA issues carries its role as a URI
//! subject-alternative name: `quern:namenode`, `quern:datanode:<id>`,
//! `quern:admin:<name>` or `quern:user:<name>`, plus `quern:group:<name>`
//! for each group a user belongs to. The transport reads it from the
//! verified peer certificate and hands it to every handler, so a handler
//! decides on what the CA vouched for, never on what a message claims.

use crate::error::{Error, Result};
use crate::ids::NodeId;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::fmt;

const SCHEME: &str = "quern:";

/// A certificate's role.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Namenode,
    Datanode(NodeId),
    /// The superuser: every permission check passes.
    Admin(String),
    User(String),
}

impl Role {
    /// The user name for namespace permissions: admins and users only.
    pub fn user(&self) -> Option<&str> {
        match self {
            Role::Admin(n) | Role::User(n) => Some(n),
            _ => None,
        }
    }

    pub fn is_server(&self) -> bool {
        matches!(self, Role::Namenode | Role::Datanode(_))
    }

    fn uri(&self) -> String {
        match self {
            Role::Namenode => format!("{SCHEME}namenode"),
            Role::Datanode(id) => format!("{SCHEME}datanode:{:016x}", id.0),
            Role::Admin(n) => format!("{SCHEME}admin:{n}"),
            Role::User(n) => format!("{SCHEME}user:{n}"),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Namenode => f.write_str("the namenode"),
            Role::Datanode(id) => write!(f, "datanode {id}"),
            Role::Admin(n) => write!(f, "admin {n}"),
            Role::User(n) => write!(f, "user {n}"),
        }
    }
}

/// A verified identity: the role and, for users, their groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub role: Role,
    pub groups: Vec<String>,
}

impl Principal {
    pub fn new(role: Role) -> Principal {
        Principal {
            role,
            groups: Vec::new(),
        }
    }

    /// The URIs a certificate for this principal carries.
    pub fn uris(&self) -> Vec<String> {
        let mut v = vec![self.role.uri()];
        v.extend(self.groups.iter().map(|g| format!("{SCHEME}group:{g}")));
        v
    }

    /// Reads the role from a DER certificate (already verified by TLS).
    pub fn from_cert(der: &CertificateDer<'_>) -> Result<Principal> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| Error::Tls(format!("unreadable certificate: {e}")))?;
        let mut role = None;
        let mut groups = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name {
                    match parse_uri(uri)? {
                        Some(Parsed::Role(r)) => role = Some(r),
                        Some(Parsed::Group(g)) => groups.push(g),
                        None => {}
                    }
                }
            }
        }
        let role = role.ok_or_else(|| {
            Error::Tls(format!(
                "certificate '{}' names no quern role (it predates roles, or was not issued by \
                 `quern cluster`); issue a new one with `quern cluster up` or `quern cluster \
                 add-user`",
                cert.subject()
            ))
        })?;
        Ok(Principal { role, groups })
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.role.fmt(f)
    }
}

enum Parsed {
    Role(Role),
    Group(String),
}

fn parse_uri(uri: &str) -> Result<Option<Parsed>> {
    let Some(rest) = uri.strip_prefix(SCHEME) else {
        return Ok(None);
    };
    let (kind, arg) = rest.split_once(':').unwrap_or((rest, ""));
    let bad = || Error::Tls(format!("certificate role '{uri}' is malformed"));
    Ok(Some(match kind {
        "namenode" => Parsed::Role(Role::Namenode),
        "datanode" => Parsed::Role(Role::Datanode(NodeId(
            u64::from_str_radix(arg, 16).map_err(|_| bad())?,
        ))),
        "admin" => Parsed::Role(Role::Admin(valid_name(arg).map_err(|_| bad())?)),
        "user" => Parsed::Role(Role::User(valid_name(arg).map_err(|_| bad())?)),
        "group" => Parsed::Group(valid_name(arg).map_err(|_| bad())?),
        _ => return Ok(None),
    }))
}

/// User and group names: what HDFS and POSIX accept, without anything that
/// would need quoting in a URI, a path or a TOML file.
pub fn valid_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
    if ok {
        Ok(name.to_string())
    } else {
        Err(Error::Config(format!(
            "'{name}' is not a valid user or group name: use 1 to 32 of a-z, 0-9, '_', '.', '-', \
             starting with a letter or '_'"
        )))
    }
}

/// What a caller expects the server it reaches to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Namenode,
    Datanode(NodeId),
    /// Benchmarks and protocol tests that talk to a bare endpoint.
    Any,
}

impl Expect {
    pub fn admits(&self, role: &Role) -> bool {
        match (self, role) {
            (Expect::Any, _) => true,
            (Expect::Namenode, Role::Namenode) => true,
            (Expect::Datanode(want), Role::Datanode(got)) => want == got,
            _ => false,
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expect::Namenode => f.write_str("the namenode"),
            Expect::Datanode(id) => write!(f, "datanode {id}"),
            Expect::Any => f.write_str("any quern server"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("alice").is_ok());
        assert!(valid_name("_svc.ml-2").is_ok());
        for bad in ["", "Alice", "a b", "a:b", "a/b", "9lives", &"x".repeat(33)] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uris_parse_back() {
        for role in [
            Role::Namenode,
            Role::Datanode(NodeId(0xdead_beef)),
            Role::Admin("admin".into()),
            Role::User("bob".into()),
        ] {
            match parse_uri(&role.uri()).unwrap() {
                Some(Parsed::Role(r)) => assert_eq!(r, role),
                _ => panic!("{role:?} did not parse"),
            }
        }
        assert!(parse_uri("https://example").unwrap().is_none());
        assert!(parse_uri("quern:datanode:xyz").is_err());
    }
}
