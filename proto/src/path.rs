//! Remote paths: absolute, `/`-separated, no `.`/`..`, no empty names.

use crate::error::{ErrorCode, WireError};
use serde::{Deserialize, Serialize};
use std::fmt;

pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_NAME_LEN: usize = 255;

/// A validated absolute remote path. The root is `/`; every other path has
/// no trailing slash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RemotePath(String);

impl RemotePath {
    pub fn root() -> RemotePath {
        RemotePath("/".into())
    }

    /// Validates a user-supplied path. A single trailing slash is accepted
    /// (`/data/` is `/data`) because shells and users type it.
    pub fn parse(raw: &str) -> Result<RemotePath, WireError> {
        let bad = |why: &str| {
            WireError::new(
                ErrorCode::InvalidPath,
                format!("invalid path {raw:?}: {why}"),
            )
        };
        if raw.is_empty() {
            return Err(bad(
                "empty path; remote paths are absolute, like /data/file",
            ));
        }
        if raw.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        if !raw.starts_with('/') {
            return Err(bad("remote paths must be absolute (start with /)"));
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(bad(&format!("longer than {MAX_PATH_LEN} bytes")));
        }
        if raw == "/" {
            return Ok(RemotePath::root());
        }
        let trimmed = raw.strip_suffix('/').unwrap_or(raw);
        for name in trimmed[1..].split('/') {
            match name {
                "" => return Err(bad("empty name between slashes")),
                "." | ".." => {
                    return Err(bad("`.` and `..` components are not allowed"));
                }
                n if n.len() > MAX_NAME_LEN => {
                    return Err(bad(&format!("a name is longer than {MAX_NAME_LEN} bytes")));
                }
                _ => {}
            }
        }
        Ok(RemotePath(trimmed.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The names from the root down; empty for `/`.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// The last name, or `None` for the root.
    pub fn name(&self) -> Option<&str> {
        if self.is_root() {
            None
        } else {
            self.0.rsplit('/').next()
        }
    }

    pub fn parent(&self) -> Option<RemotePath> {
        if self.is_root() {
            return None;
        }
        match self.0.rfind('/') {
            Some(0) => Some(RemotePath::root()),
            Some(i) => Some(RemotePath(self.0[..i].to_string())),
            None => None,
        }
    }

    /// A child of this directory; `name` must be a valid single name.
    pub fn join(&self, name: &str) -> Result<RemotePath, WireError> {
        if self.is_root() {
            RemotePath::parse(&format!("/{name}"))
        } else {
            RemotePath::parse(&format!("{}/{name}", self.0))
        }
        .and_then(|p| {
            if name.contains('/') {
                Err(WireError::new(
                    ErrorCode::InvalidPath,
                    format!("invalid name {name:?}: contains a slash"),
                ))
            } else {
                Ok(p)
            }
        })
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RemotePath) -> bool {
        other.is_root()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }
}

impl fmt::Display for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_absolute_paths() {
        assert_eq!(RemotePath::parse("/").unwrap().as_str(), "/");
        assert_eq!(RemotePath::parse("/a/b").unwrap().as_str(), "/a/b");
        assert_eq!(RemotePath::parse("/a/b/").unwrap().as_str(), "/a/b");
        let p = RemotePath::parse("/a/b/c").unwrap();
        assert_eq!(p.parent().unwrap().as_str(), "/a/b");
        assert_eq!(p.name(), Some("c"));
        assert_eq!(
            RemotePath::parse("/a").unwrap().parent().unwrap().as_str(),
            "/"
        );
        assert!(p.starts_with(&RemotePath::parse("/a").unwrap()));
        assert!(!RemotePath::parse("/ab")
            .unwrap()
            .starts_with(&RemotePath::parse("/a").unwrap()));
    }

    #[test]
    fn refuses_bad_paths_with_a_reason() {
        for (raw, why) in [
            ("", "empty path"),
            ("a/b", "must be absolute"),
            ("/a//b", "empty name"),
            ("/a/../b", "`..`"),
            ("/a/./b", "`.`"),
            ("/a\0b", "NUL"),
        ] {
            let err = RemotePath::parse(raw).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidPath);
            assert!(err.message.contains(why), "{raw:?}: {}", err.message);
        }
        let long = format!("/{}", "x".repeat(300));
        assert!(RemotePath::parse(&long)
            .unwrap_err()
            .message
            .contains("longer than 255"));
    }
}
