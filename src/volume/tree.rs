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
    // The numbers are the binary tree encoding's: never reorder them.
    File = 0,
    Dir = 1,
    Symlink = 2,
    Fifo = 3,
    Socket = 4,
    Char = 5,
    Block = 6,
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

/// The first bytes of a tree in the binary encoding. (A JSON tree starts
/// with `{`.)
const TREE_MAGIC: &[u8; 8] = b"FRYTREE\x01";

impl Tree {
    /// The binary encoding, written to format-2 repositories: the magic,
    /// the entry count, then per entry its fields in declaration order,
    /// integers as LEB128 varints (times' seconds zigzagged), names, link
    /// targets and xattrs as length-prefixed bytes, chunk and subtree ids
    /// as 32 raw bytes. Decoding a volume's trees this way is several times
    /// faster than JSON, which an unchanged re-backup spends most of its
    /// time on after the key derivation. Deterministic: an unchanged
    /// directory encodes to the same bytes, so the same blob.
    pub fn to_binary(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 64);
        out.extend_from_slice(TREE_MAGIC);
        put_varint(&mut out, self.entries.len() as u64);
        for node in &self.entries {
            put_bytes(&mut out, node.name.0.as_bytes());
            out.push(node.kind as u8);
            for n in [
                u64::from(node.mode),
                u64::from(node.uid),
                u64::from(node.gid),
                node.size,
            ] {
                put_varint(&mut out, n);
            }
            for (seconds, nanos) in [node.mtime, node.ctime] {
                put_varint(&mut out, ((seconds << 1) ^ (seconds >> 63)) as u64);
                put_varint(&mut out, u64::from(nanos));
            }
            for n in [node.inode, node.links, node.rdev] {
                put_varint(&mut out, n);
            }
            put_varint(&mut out, node.content.len() as u64);
            for piece in &node.content {
                match piece {
                    Piece::Chunk(id) => {
                        out.push(0);
                        out.extend_from_slice(&id.0);
                    }
                    Piece::Zeros(n) => {
                        out.push(1);
                        put_varint(&mut out, *n);
                    }
                }
            }
            match &node.subtree {
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(&id.0);
                }
                None => out.push(0),
            }
            match &node.target {
                Some(target) => {
                    out.push(1);
                    put_bytes(&mut out, target.0.as_bytes());
                }
                None => out.push(0),
            }
            put_varint(&mut out, node.xattrs.len() as u64);
            for (name, value) in &node.xattrs {
                put_bytes(&mut out, name.0.as_bytes());
                put_bytes(&mut out, value.as_bytes());
            }
        }
        out
    }

    /// A tree in either encoding, told apart by the magic.
    pub fn decode(bytes: &[u8]) -> Result<Tree, String> {
        match bytes.strip_prefix(TREE_MAGIC.as_slice()) {
            Some(binary) => Self::from_binary(binary),
            None => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }

    fn from_binary(mut rest: &[u8]) -> Result<Tree, String> {
        let r = &mut rest;
        let count = varint(r)?;
        // Every entry takes at least 20 bytes: a damaged count cannot
        // reserve more than the input could hold.
        let mut entries = Vec::with_capacity((count as usize).min(r.len() / 20));
        for _ in 0..count {
            let name = Name(OsString::from_vec(bytes_of(r)?.to_vec()));
            let kind = match take(r, 1)?[0] {
                0 => NodeKind::File,
                1 => NodeKind::Dir,
                2 => NodeKind::Symlink,
                3 => NodeKind::Fifo,
                4 => NodeKind::Socket,
                5 => NodeKind::Char,
                6 => NodeKind::Block,
                other => return Err(format!("entry '{name}': unknown kind {other}")),
            };
            let small = |r: &mut &[u8], what: &str| {
                u32::try_from(varint(r)?)
                    .map_err(|_| format!("entry '{name}': {what} out of range"))
            };
            let mode = small(r, "mode")?;
            let uid = small(r, "uid")?;
            let gid = small(r, "gid")?;
            let size = varint(r)?;
            let time = |r: &mut &[u8]| -> Result<(i64, u32), String> {
                let zigzag = varint(r)?;
                let seconds = ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64);
                Ok((seconds, small(r, "nanoseconds")?))
            };
            let mtime = time(r)?;
            let ctime = time(r)?;
            let (inode, links, rdev) = (varint(r)?, varint(r)?, varint(r)?);
            let pieces = varint(r)? as usize;
            let mut content = Vec::with_capacity(pieces.min(r.len() / 2));
            for _ in 0..pieces {
                content.push(match take(r, 1)?[0] {
                    0 => Piece::Chunk(blob_id(r)?),
                    1 => Piece::Zeros(varint(r)?),
                    other => return Err(format!("entry '{name}': unknown piece {other}")),
                });
            }
            let subtree = match take(r, 1)?[0] {
                0 => None,
                1 => Some(blob_id(r)?),
                other => return Err(format!("entry '{name}': bad subtree flag {other}")),
            };
            let target = match take(r, 1)?[0] {
                0 => None,
                1 => Some(Name(OsString::from_vec(bytes_of(r)?.to_vec()))),
                other => return Err(format!("entry '{name}': bad target flag {other}")),
            };
            let attrs = varint(r)? as usize;
            let mut xattrs = Vec::with_capacity(attrs.min(r.len() / 2));
            for _ in 0..attrs {
                let attr = Name(OsString::from_vec(bytes_of(r)?.to_vec()));
                let value = std::str::from_utf8(bytes_of(r)?)
                    .map_err(|_| format!("entry '{name}': an xattr value is not text"))?;
                xattrs.push((attr, value.to_string()));
            }
            entries.push(Node {
                name,
                kind,
                mode,
                uid,
                gid,
                size,
                mtime,
                ctime,
                inode,
                links,
                content,
                subtree,
                target,
                rdev,
                xattrs,
            });
        }
        if !rest.is_empty() {
            return Err(format!("{} bytes after the last entry", rest.len()));
        }
        Ok(Tree { entries })
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    crate::repo::take_bytes(rest, n).ok_or_else(|| "the tree ends early".into())
}

fn varint(rest: &mut &[u8]) -> Result<u64, String> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = take(rest, 1)?[0];
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err("a number in the tree is too large".into());
        }
        n |= bits << shift;
        if byte < 0x80 {
            return Ok(n);
        }
    }
    Err("a number in the tree is too large".into())
}

fn bytes_of<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = usize::try_from(varint(rest)?).map_err(|_| "a length out of range".to_string())?;
    take(rest, len)
}

fn blob_id(rest: &mut &[u8]) -> Result<BlobId, String> {
    Ok(BlobId(take(rest, 32)?.try_into().expect("32 bytes")))
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

    /// Every field set to something other than its default, edges included.
    fn varied_tree() -> Tree {
        let mut dir = node(b"sub");
        dir.kind = NodeKind::Dir;
        dir.content = vec![];
        dir.subtree = Some(BlobId([3; 32]));
        let mut link = node(b"link");
        link.kind = NodeKind::Symlink;
        link.content = vec![];
        link.target = Some(Name(OsString::from_vec(b"../t\xff".to_vec())));
        let mut dev = node(b"dev");
        dev.kind = NodeKind::Block;
        dev.rdev = u64::MAX;
        dev.content = vec![];
        let mut odd = node(b"caf\xe9");
        odd.mtime = (i64::MIN, 999_999_999);
        odd.ctime = (-1, 0);
        odd.size = u64::MAX;
        odd.inode = u64::MAX;
        odd.links = 3;
        odd.mode = 0o7777;
        odd.uid = u32::MAX;
        odd.xattrs = vec![
            (Name("user.a".into()), "00ff".into()),
            (Name("user.b".into()), String::new()),
        ];
        odd.content = vec![
            Piece::Zeros(u64::MAX),
            Piece::Chunk(BlobId([0xee; 32])),
            Piece::Zeros(0),
        ];
        let mut fifo = node(b"fifo");
        fifo.kind = NodeKind::Fifo;
        fifo.mtime = (i64::MAX, 1);
        Tree {
            entries: vec![node(b"plain.txt"), dir, link, dev, odd, fifo],
        }
    }

    #[test]
    fn binary_trees_round_trip_and_json_trees_are_still_read() {
        for tree in [Tree::default(), varied_tree()] {
            let binary = tree.to_binary();
            assert!(binary.starts_with(TREE_MAGIC));
            assert_eq!(Tree::decode(&binary).unwrap(), tree);
            assert_eq!(tree.to_binary(), binary, "the same tree, the same bytes");
            let json = serde_json::to_vec(&tree).unwrap();
            assert_eq!(Tree::decode(&json).unwrap(), tree);
        }
        // Small: a file's entry is a fraction of its JSON.
        let tree = varied_tree();
        assert!(tree.to_binary().len() * 2 < serde_json::to_vec(&tree).unwrap().len());
    }

    #[test]
    fn a_damaged_binary_tree_is_an_error_never_a_shorter_listing() {
        let binary = varied_tree().to_binary();
        for cut in TREE_MAGIC.len()..binary.len() {
            assert!(Tree::decode(&binary[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = binary.clone();
        longer.push(0);
        assert!(
            Tree::decode(&longer)
                .unwrap_err()
                .contains("after the last entry")
        );
        // A count of 2^63 entries is refused without reserving for it.
        let mut huge = TREE_MAGIC.to_vec();
        put_varint(&mut huge, 1 << 63);
        assert!(Tree::decode(&huge).unwrap_err().contains("ends early"));
        // A varint longer than 64 bits.
        let mut long = TREE_MAGIC.to_vec();
        long.extend_from_slice(&[0xff; 10]);
        long.push(0x01);
        assert!(Tree::decode(&long).unwrap_err().contains("too large"));
        // An unknown kind names the entry.
        let mut bad_kind = TREE_MAGIC.to_vec();
        put_varint(&mut bad_kind, 1);
        put_bytes(&mut bad_kind, b"x");
        bad_kind.push(9);
        let err = Tree::decode(&bad_kind).unwrap_err();
        assert!(
            err.contains("'x'") && err.contains("unknown kind 9"),
            "{err}"
        );
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
