//! What a volume snapshot stores: one tree blob per directory, listing its
//! entries with their metadata and, for files, the chunks of their content.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use serde::{Deserialize, Serialize};

use crate::repo::BlobId;

/// The format of trees and volume roots this version writes and reads.
pub const VOLUME_FORMAT: u32 = 1;

/// The one entry of a block volume's tree: the device's content. (A
/// version that does not know block volumes restores it as this file.)
pub const DEVICE_ENTRY: &str = "device";

/// A directory's entries, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    pub entries: Vec<Node>,
}

/// What kind of file system entry a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: Name,
    pub kind: NodeKind,
    /// Permission bits, setuid, setgid and sticky (the low 12 bits of st_mode).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    #[serde(default)]
    pub size: u64,
    /// Modification time: seconds and nanoseconds since the epoch. Access
    /// times are not kept: reading a tree changes them, and an unchanged
    /// tree must store the same blob.
    pub mtime: (i64, u32),
    /// Change time and inode: compared with the parent snapshot to decide
    /// whether a file can be taken over without reading it.
    pub ctime: (i64, u32),
    pub inode: u64,
    /// Hard links of a file; > 1 makes the restore link the paths that share
    /// `inode` within the snapshot.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub links: u64,
    /// A file's content, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Piece>,
    /// A directory's tree blob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<BlobId>,
    /// A symbolic link's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Name>,
    /// The device number of a character or block device.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// Extended attributes, values in hex.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(Name, String)>,
}

fn one() -> u64 {
    1
}
fn is_one(n: &u64) -> bool {
    *n == 1
}
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A stretch of a file: a stored chunk, or a run of zero bytes that the
/// restore leaves as a hole (sparse files stay sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Piece {
    Chunk(BlobId),
    Zeros(u64),
}

/// A file name as the file system has it: any bytes but `/` and NUL.
/// Stored as a string when it is UTF-8, else as `{"hex": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(pub OsString);

impl Name {
    pub fn as_os_str(&self) -> &OsStr {
        &self.0
    }

    /// Whether the name is one a tree may hold: a single path component.
    pub fn is_plain_component(&self) -> bool {
        let bytes = self.0.as_bytes();
        !bytes.is_empty() && bytes != b"." && bytes != b".." && !bytes.contains(&b'/')
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.to_string_lossy())
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum StoredName {
    Text(String),
    Bytes { hex: String },
}

impl Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.to_str() {
            Some(text) => StoredName::Text(text.to_string()),
            None => StoredName::Bytes {
                hex: hex::encode(self.0.as_bytes()),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A string, or `{"hex": ...}` for a name that is not UTF-8: read
        /// without the buffering of an untagged enum (a volume's trees
        /// hold a name per file).
        struct NameVisitor;
        impl<'de> serde::de::Visitor<'de> for NameVisitor {
            type Value = Name;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a file name: a string, or {\"hex\": ...}")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Name, E> {
                Ok(Name(OsString::from(text)))
            }
            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Name, E> {
                Ok(Name(OsString::from(text)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Name, A::Error> {
                let mut bytes = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "hex" || bytes.is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "unexpected field '{key}' in a file name"
                        )));
                    }
                    let hex: String = map.next_value()?;
                    bytes = Some(hex::decode(hex).map_err(serde::de::Error::custom)?);
                }
                let bytes = bytes.ok_or_else(|| serde::de::Error::missing_field("hex"))?;
                Ok(Name(OsString::from_vec(bytes)))
            }
        }
        d.deserialize_any(NameVisitor)
    }
}

/// The root of a volume's data: what a volume snapshot or an application
/// snapshot's volume entry points at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRoot {
    pub format: u32,
    /// What was backed up: `HOST:PATH` for a directory, `NAMESPACE/CLAIM`
    /// for a PersistentVolumeClaim.
    pub source: String,
    pub created: String,
    /// The tree of the top directory.
    pub tree: BlobId,
    /// The metadata of the top directory itself.
    pub top: Node,
    /// The data of a block device (or a disk image file): the tree holds
    /// one file, [`DEVICE_ENTRY`], with the device's whole content.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block: bool,
    /// Every blob the volume uses (trees and chunks), as a reference list.
    pub refs: BlobId,
    pub stats: super::VolumeStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &[u8]) -> Node {
        Node {
            name: Name(OsString::from_vec(name.to_vec())),
            kind: NodeKind::File,
            mode: 0o644,
            uid: 1000,
            gid: 1000,
            size: 3,
            mtime: (1, 2),
            ctime: (5, 6),
            inode: 7,
            links: 1,
            content: vec![Piece::Chunk(BlobId([9; 32])), Piece::Zeros(4096)],
            subtree: None,
            target: None,
            rdev: 0,
            xattrs: vec![],
        }
    }

    #[test]
    fn trees_round_trip_with_names_that_are_not_utf8() {
        let tree = Tree {
            entries: vec![node(b"plain.txt"), node(b"caf\xe9")],
        };
        let json = serde_json::to_string(&tree).unwrap();
        assert!(json.contains(r#""name":"plain.txt""#), "{json}");
        assert!(json.contains(r#""name":{"hex":"636166e9"}"#), "{json}");
        assert!(
            json.contains(r#""content":[""#) && json.contains(",4096]"),
            "{json}"
        );
        assert!(
            !json.contains("links"),
            "a single link is not stored: {json}"
        );
        let back: Tree = serde_json::from_str(&json).unwrap();
        assert_eq!(back, tree);
    }

    #[test]
    fn names_read_as_strings_or_hex_and_nothing_else() {
        let read = |json: &str| serde_json::from_str::<Name>(json);
        assert_eq!(read(r#""plain""#).unwrap(), Name("plain".into()));
        assert_eq!(read(r#""caf\u00e9""#).unwrap(), Name("café".into()));
        assert_eq!(
            read(r#"{"hex":"636166e9"}"#).unwrap(),
            Name(OsString::from_vec(b"caf\xe9".to_vec()))
        );
        for bad in [
            r#"{"hex":"zz"}"#,
            r#"{"hex":"00","hex":"01"}"#,
            r#"{"other":"00"}"#,
            "{}",
            "7",
            "null",
            "[]",
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_that_would_leave_the_directory_are_not_plain_components() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"../../etc"] {
            assert!(
                !Name(OsString::from_vec(bad.to_vec())).is_plain_component(),
                "{bad:?}"
            );
        }
        assert!(Name(OsString::from("..a")).is_plain_component());
    }
}
