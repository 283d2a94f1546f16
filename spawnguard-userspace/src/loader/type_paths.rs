//! The type paths the kernel follows (`cgroup_mkdir`): one tree of the directories on the way
//! to every type directory, with node numbers stable across policy changes and restarts.

use std::path::PathBuf;

use anyhow::{bail, Result};
use aya::maps::HashMap;
use spawnguard_common::{maps, PathKey, PathNode, MAX_PATH_NODES, NO_TYPE, PATH_NAME_LEN};

use super::{open_pinned, Enforcer, PlacedType};
use crate::{cgroupfs, policy::Policy};

impl Enforcer {
    /// Writes the type paths for the kernel to follow (`cgroup_mkdir`), and the directories that
    /// stand on them now, so that a type directory (or one on its way) removed and created
    /// again is the type's from its first instant.
    pub(super) fn follow_type_paths(&self, policy: &Policy, types: &[PlacedType]) -> Result<()> {
        let tree = TypePaths::new(policy, types)?;
        let mut children: HashMap<_, PathKey, PathNode> =
            HashMap::try_from(open_pinned(&self.dir, maps::PATH_CHILDREN)?)?;
        let mut standing: HashMap<_, u64, PathNode> =
            HashMap::try_from(open_pinned(&self.dir, maps::PATH_DIRS)?)?;
        // New paths first, then the directories on them, then what no longer is a path: a
        // directory created meanwhile is followed by the kernel under either policy.
        for (key, node) in &tree.children {
            children.insert(*key, *node, 0)?;
        }
        for (dir, node) in &tree.dirs {
            if let Ok(id) = cgroupfs::cgroup_id(dir) {
                standing.insert(id, *node, 0)?;
            }
        }
        let old_keys: Vec<PathKey> = children
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !tree.children.iter().any(|(key, _)| key == k))
            .collect();
        for k in old_keys {
            children.remove(&k)?;
        }
        let stale: Vec<u64> = standing
            .iter()
            .filter_map(Result::ok)
            .filter(|(id, node)| {
                !tree
                    .dirs
                    .iter()
                    .any(|(dir, n)| n == node && cgroupfs::cgroup_id(dir).is_ok_and(|d| d == *id))
            })
            .map(|(id, _)| id)
            .collect();
        for id in stale {
            standing.remove(&id)?;
        }
        Ok(())
    }
}

/// The type paths as the kernel follows them: node 0 is the cgroup2 mount's root, every other
/// node a directory on the way to a type directory or a type directory. A node's number is a
/// hash of its path, so it stays the same across policy changes and restarts.
struct TypePaths {
    children: Vec<(PathKey, PathNode)>,
    /// Where each node's directory is (the root included).
    dirs: Vec<(PathBuf, PathNode)>,
}

impl TypePaths {
    fn new(policy: &Policy, types: &[PlacedType]) -> Result<Self> {
        let mut tree = Self {
            children: Vec::new(),
            dirs: Vec::new(),
        };
        for (t, placed) in policy.types.iter().zip(types) {
            let parts: Vec<&str> = t.path.split('/').filter(|c| !c.is_empty()).collect();
            // The mount point: the type directory less its path.
            let mut dir = placed.dir.clone();
            for _ in &parts {
                dir.pop();
            }
            if tree.dirs.is_empty() {
                tree.dirs.push((
                    dir.clone(),
                    PathNode {
                        node: 0,
                        type_idx: NO_TYPE,
                        level: placed.level - parts.len() as u32,
                        _pad: 0,
                    },
                ));
            }
            let mut parent = 0;
            for (depth, part) in parts.iter().enumerate() {
                let last = depth + 1 == parts.len();
                let prefix = parts[..=depth].join("/");
                let node = PathNode {
                    node: path_node(&prefix),
                    type_idx: if last { placed.index } else { NO_TYPE },
                    level: placed.level - (parts.len() - depth - 1) as u32,
                    _pad: 0,
                };
                let mut name = [0u8; PATH_NAME_LEN];
                if part.len() > PATH_NAME_LEN - 2 {
                    bail!(
                        "type \"{}\": path component \"{part}\" is longer than {} bytes",
                        t.name,
                        PATH_NAME_LEN - 2
                    );
                }
                name[..part.len()].copy_from_slice(part.as_bytes());
                let key = PathKey {
                    parent,
                    _pad: 0,
                    name,
                };
                dir.push(part);
                match tree.children.iter().find(|(k, _)| *k == key) {
                    // A directory on the way to two types (types never contain each other).
                    Some((_, n)) if n.node == node.node => {}
                    Some(_) => bail!("type path \"{prefix}\" has the node of another path"),
                    None => {
                        if tree.dirs.iter().any(|(_, n)| n.node == node.node) {
                            bail!("type path \"{prefix}\" has the node of another path");
                        }
                        tree.children.push((key, node));
                        tree.dirs.push((dir.clone(), node));
                    }
                }
                parent = node.node;
            }
        }
        if tree.dirs.len() > MAX_PATH_NODES as usize {
            bail!(
                "the type paths have {} directories on them; at most {MAX_PATH_NODES} are supported",
                tree.dirs.len()
            );
        }
        Ok(tree)
    }
}

/// A path's node number: FNV-1a of the path, never 0 (the root's).
fn path_node(path: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in path.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::placed;

    #[test]
    fn type_paths_are_one_tree_with_stable_nodes() {
        let text = "[[type]]\nname = \"a\"\npath = \"agents/a\"\nmax_tasks = 5\n\
                    [[type]]\nname = \"b\"\npath = \"agents/deep/b\"\nmax_tasks = 5\n";
        let policy = Policy::parse(text, "p.toml").unwrap();
        let tree = TypePaths::new(&policy, &placed(&policy, "/cg")).unwrap();
        // root, agents, agents/a, agents/deep, agents/deep/b: "agents" once.
        let dirs: Vec<String> = tree
            .dirs
            .iter()
            .map(|(d, _)| d.display().to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "/cg",
                "/cg/agents",
                "/cg/agents/a",
                "/cg/agents/deep",
                "/cg/agents/deep/b"
            ]
        );
        assert_eq!(tree.children.len(), 4);
        let node = |d: &str| tree.dirs.iter().find(|(p, _)| p.ends_with(d)).unwrap().1;
        assert_eq!(node("/cg").node, 0);
        assert_eq!(node("agents").type_idx, NO_TYPE);
        assert_eq!(node("agents/a").type_idx, 7);
        assert_eq!(node("deep/b").type_idx, 8);
        assert_eq!(node("deep/b").level, 3);
        // A child is keyed by its parent's node and its own name.
        let (key, b) = tree.children.iter().find(|(_, n)| n.type_idx == 8).unwrap();
        assert_eq!(key.parent, node("agents/deep").node);
        assert_eq!(&key.name[..2], b"b\0");
        assert_eq!(b.node, path_node("agents/deep/b"));
        // The same paths in another policy have the same nodes.
        let again = TypePaths::new(&policy, &placed(&policy, "/cg")).unwrap();
        assert_eq!(again.children, tree.children);
    }
}
