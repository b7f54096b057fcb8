//! Inode numbers for a path-based namespace.
//!
//! The client library names files by path, the kernel by inode number. This
//! table hands out a fresh number the first time the kernel is told about a
//! path and keeps it until the kernel forgets it, so a number never changes
//! meaning while the kernel holds it. Renames move the numbers along with
//! the paths (and everything below a renamed directory); an unlinked or
//! replaced path keeps its number, detached, until the kernel forgets it.

use std::collections::{BTreeMap, HashMap};

pub(crate) const ROOT: u64 = 1;

struct Node {
    /// Path relative to the mount's remote root; `None` once unlinked.
    path: Option<String>,
    /// How many times the kernel was handed this number (FUSE `nlookup`).
    lookups: u64,
}

pub(crate) struct Inodes {
    nodes: HashMap<u64, Node>,
    paths: BTreeMap<String, u64>,
    next: u64,
}

impl Inodes {
    pub(crate) fn new() -> Inodes {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                path: Some(String::new()),
                // The kernel never forgets the root.
                lookups: u64::MAX / 2,
            },
        );
        let mut paths = BTreeMap::new();
        paths.insert(String::new(), ROOT);
        Inodes {
            nodes,
            paths,
            next: ROOT + 1,
        }
    }

    pub(crate) fn path(&self, ino: u64) -> Option<&str> {
        self.nodes.get(&ino).and_then(|n| n.path.as_deref())
    }

    pub(crate) fn ino(&self, path: &str) -> Option<u64> {
        self.paths.get(path).copied()
    }

    /// The number for `path`, counting one more kernel reference to it.
    pub(crate) fn lookup(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.paths.get(path) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.lookups += 1;
                return ino;
            }
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                path: Some(path.to_string()),
                lookups: 1,
            },
        );
        self.paths.insert(path.to_string(), ino);
        ino
    }

    /// The kernel dropped `n` references (FUSE `forget`); true when the
    /// number is gone.
    pub(crate) fn forget(&mut self, ino: u64, n: u64) -> bool {
        if ino == ROOT {
            return false;
        }
        let gone = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(Node { path: Some(p), .. }) = self.nodes.remove(&ino) {
                if self.paths.get(&p) == Some(&ino) {
                    self.paths.remove(&p);
                }
            }
        }
        gone
    }

    /// `path` (and anything below it) no longer exists.
    pub(crate) fn detach(&mut self, path: &str) {
        for (p, ino) in self.subtree(path) {
            self.paths.remove(&p);
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = None;
            }
        }
    }

    /// `from` (and anything below it) is now called `to`; whatever was at
    /// `to` was replaced.
    pub(crate) fn rename(&mut self, from: &str, to: &str) {
        if from == to {
            return;
        }
        self.detach(to);
        for (p, ino) in self.subtree(from) {
            let moved = format!("{to}{}", &p[from.len()..]);
            self.paths.remove(&p);
            self.paths.insert(moved.clone(), ino);
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = Some(moved);
            }
        }
    }

    /// `path` and every known path below it, with their numbers.
    fn subtree(&self, path: &str) -> Vec<(String, u64)> {
        let below = format!("{path}/");
        self.paths
            .range(path.to_string()..)
            .take_while(|(p, _)| p.starts_with(path))
            .filter(|(p, _)| p.as_str() == path || p.starts_with(&below))
            .map(|(p, &i)| (p.clone(), i))
            .collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_renames_and_die_with_forget() {
        let mut t = Inodes::new();
        let d = t.lookup("d");
        let f = t.lookup("d/f");
        let other = t.lookup("d f");
        t.rename("d", "e");
        assert_eq!(t.path(d), Some("e"));
        assert_eq!(t.path(f), Some("e/f"));
        assert_eq!(t.path(other), Some("d f"));
        assert_eq!(t.ino("e/f"), Some(f));
        assert_eq!(t.ino("d/f"), None);

        // Renaming over an existing file detaches the old one.
        let g = t.lookup("g");
        t.rename("e/f", "g");
        assert_eq!(t.path(g), None);
        assert_eq!(t.ino("g"), Some(f));

        t.forget(g, 1);
        t.forget(f, 1);
        assert_eq!(t.ino("g"), None);
        t.detach("e");
        assert_eq!(t.path(d), None);
        t.forget(d, 1);
        t.forget(other, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.path(ROOT), Some(""));
    }

    #[test]
    fn a_number_is_kept_until_every_lookup_is_forgotten() {
        let mut t = Inodes::new();
        let a = t.lookup("a");
        assert_eq!(t.lookup("a"), a);
        t.forget(a, 1);
        assert_eq!(t.path(a), Some("a"));
        t.forget(a, 1);
        assert_eq!(t.path(a), None);
        assert_ne!(t.lookup("a"), a);
    }
}
