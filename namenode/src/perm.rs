//! Who may do what: roles per request kind, and HDFS-style permissions
//! (owner, group, mode; the admin certificate is the superuser).

use crate::namespace::Inode;
use quern_proto::msg::FileKind;
use quern_proto::{ErrorCode, NodeId, Principal, Role, WireError};

pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

/// The user a namespace request runs as.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub superuser: bool,
}

pub fn denied(message: String) -> WireError {
    WireError::new(ErrorCode::PermissionDenied, message)
}

impl User {
    /// Namespace requests come from users and the admin only.
    pub fn of(caller: &Principal, what: &str) -> Result<User, WireError> {
        match &caller.role {
            Role::Admin(name) => Ok(User {
                name: name.clone(),
                groups: caller.groups.clone(),
                superuser: true,
            }),
            Role::User(name) => Ok(User {
                name: name.clone(),
                groups: caller.groups.clone(),
                superuser: false,
            }),
            other => Err(denied(format!(
                "permission denied: {what} is for users and the admin; this connection presented \
                 the certificate of {other}"
            ))),
        }
    }

    pub fn may(&self, inode: &Inode, want: u32) -> bool {
        if self.superuser {
            return true;
        }
        // As in POSIX and HDFS, the owner gets the owner bits only.
        let bits = if inode.owner == self.name {
            inode.mode >> 6
        } else if self.groups.contains(&inode.group) {
            inode.mode >> 3
        } else {
            inode.mode
        } & 7;
        bits & want == want
    }

    /// `Ok` when this user may `want` on `inode` at `path`; the error names
    /// the path, its owner and mode, and what was refused.
    pub fn check(&self, path: &str, inode: &Inode, want: u32) -> Result<(), WireError> {
        if self.may(inode, want) {
            return Ok(());
        }
        let verb = match (want, inode.kind) {
            (X, _) => "enter it",
            (R, FileKind::File) => "read it",
            (W, FileKind::File) => "write it",
            (w, FileKind::Dir) if w & W != 0 => "change entries in it",
            (w, FileKind::Dir) if w & R != 0 => "list it",
            _ => "use it",
        };
        Err(denied(format!(
            "permission denied: {path} (owner {}, mode {:04o}): {} may not {verb}",
            inode.owner, inode.mode, self.name
        )))
    }

    /// x on a directory walked through (reached by `names` from the root);
    /// its path is spelled out only for the error.
    pub fn enter(&self, names: &[&str], dir: &Inode) -> Result<(), WireError> {
        if self.may(dir, X) {
            Ok(())
        } else {
            self.check(&format!("/{}", names.join("/")), dir, X)
        }
    }

    /// The sticky bit on `dir`: only the owner of the entry or of the
    /// directory may remove or rename it.
    pub fn check_sticky(&self, dir: &Inode, path: &str, entry: &Inode) -> Result<(), WireError> {
        if self.superuser || dir.mode & 0o1000 == 0 {
            return Ok(());
        }
        if entry.owner == self.name || dir.owner == self.name {
            return Ok(());
        }
        Err(denied(format!(
            "permission denied: {path} (owner {}, mode {:04o}) is in a sticky directory; only its \
             owner may remove or rename it",
            entry.owner, entry.mode
        )))
    }
}

/// Datanode requests come only from the datanode the message names.
pub fn check_datanode(caller: &Principal, claimed: NodeId, what: &str) -> Result<(), WireError> {
    match &caller.role {
        Role::Datanode(id) if *id == claimed => Ok(()),
        Role::Datanode(id) => Err(denied(format!(
            "permission denied: {what} for {claimed} came with the certificate of datanode {id}"
        ))),
        other => Err(denied(format!(
            "permission denied: {what} is for datanodes; this connection presented the \
             certificate of {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(owner: &str, group: &str, mode: u32) -> Inode {
        Inode {
            kind: FileKind::File,
            mode,
            mtime_ms: 0,
            replication: 1,
            chunk_size: 1,
            size: 0,
            owner: owner.into(),
            group: group.into(),
            chunk_count: 0,
        }
    }

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            superuser: false,
        }
    }

    #[test]
    fn owner_group_and_other_bits_as_posix() {
        let f = file("bob", "ml", 0o640);
        assert!(user("bob", &[]).may(&f, R | W));
        assert!(user("alice", &["ml"]).may(&f, R));
        assert!(!user("alice", &["ml"]).may(&f, W));
        assert!(!user("carol", &[]).may(&f, R));
        // The owner gets only the owner bits, even where others get more.
        assert!(!user("bob", &[]).may(&file("bob", "ml", 0o077), R));
        let admin = User {
            superuser: true,
            ..user("admin", &[])
        };
        assert!(admin.may(&file("bob", "ml", 0), R | W | X));
        let e = user("alice", &[])
            .check("/bob/secret", &file("bob", "bob", 0o600), R)
            .unwrap_err();
        assert_eq!(
            e.message,
            "permission denied: /bob/secret (owner bob, mode 0600): alice may not read it"
        );
        assert_eq!(e.code, ErrorCode::PermissionDenied);
    }

    #[test]
    fn datanode_requests_need_the_matching_certificate() {
        let dn = Principal::new(Role::Datanode(NodeId(7)));
        assert!(check_datanode(&dn, NodeId(7), "Register").is_ok());
        assert!(check_datanode(&dn, NodeId(8), "Register").is_err());
        let alice = Principal::new(Role::User("alice".into()));
        assert!(check_datanode(&alice, NodeId(7), "Register").is_err());
        assert!(User::of(&dn, "Stat").is_err());
    }
}
