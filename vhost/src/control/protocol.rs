//! The control-socket protocol: typed requests and replies, one JSON
//! object per line (tabled in the [module doc](super)), their checks, and
//! both ends of the wire: the client's [`request`] and the daemon's
//! reading of a request line. Kept apart from the
//! [`Daemon`](super::Daemon) so that clients such as `thinctl` use the
//! protocol without the serving side, and so that the parsing, which is
//! pure, is tested on its own.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thinlun::Policy;

/// Longest request line accepted, newline excluded.
pub const MAX_LINE: usize = 4096;
/// How long the daemon waits for a client's request line, and a client
/// for the reply (a snapshot waits for in-flight writes).
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The control socket of the pool at `pool`: `<pool path>.ctl` for a file
/// (the path made canonical, so every client finds the same socket
/// whatever its working directory), and for a block device (or anything
/// not a regular file) `/run/thinlun/<path with / as ->.ctl`.
pub fn default_control_path(pool: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(pool).unwrap_or_else(|_| pool.to_path_buf());
    let regular = std::fs::metadata(&canon)
        .map(|m| m.is_file())
        .unwrap_or(true);
    if regular {
        let mut s = canon.into_os_string();
        s.push(".ctl");
        PathBuf::from(s)
    } else {
        let flat: String = canon
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "-");
        Path::new("/run/thinlun").join(format!("{flat}.ctl"))
    }
}

/// A control request: `{"op": "snapshot", "name": "vm-1@s1"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Snapshot {
        name: String,
    },
    /// Grow the pool onto its grown file or LUN. (Empty struct variants,
    /// not unit ones: serde refuses unknown fields only in structs.)
    Grow {},
    Add {
        name: String,
        socket: PathBuf,
        #[serde(default = "one_queue")]
        queues: u16,
        /// For the target of a live migration: open the volume only when
        /// the front end starts the rings.
        #[serde(default)]
        incoming: bool,
    },
    /// Export a volume (or `VOL@SNAP`, read-only) on the daemon's NBD
    /// socket, which listens at `socket` from the first such request.
    AddNbd {
        name: String,
        socket: PathBuf,
    },
    /// Stop serving a volume (it stays in the pool): on every socket, or
    /// on the one given.
    Remove {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        socket: Option<PathBuf>,
    },
    List {},
    Status {},
    /// A thin volume; `force` passes the overcommit limit.
    Create {
        name: String,
        bytes: u64,
        #[serde(default)]
        force: bool,
    },
    /// `force` allows shrinking.
    Resize {
        name: String,
        bytes: u64,
        #[serde(default)]
        force: bool,
    },
    /// Remove a volume or snapshot from the pool.
    Delete {
        name: String,
        #[serde(default)]
        recursive: bool,
    },
    Rename {
        old: String,
        new: String,
    },
    /// `force` removes the snapshots newer than the one rolled back to.
    Rollback {
        snapshot: String,
        #[serde(default)]
        force: bool,
    },
    Clone {
        source: String,
        new: String,
    },
    Base {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_name: Option<String>,
    },
    Policy {
        #[serde(default)]
        change: PolicyChange,
    },
}

fn one_queue() -> u16 {
    1
}

const COMMANDS: &str = "snapshot, grow, add, add-nbd, remove, list, status, create, resize, \
                        delete, rename, rollback, clone, base, policy";

/// Checks a volume or snapshot name: one or two (`VOL@SNAP`) parts of
/// `A-Za-z0-9._-`. Whether a snapshot may stand there, and the finer
/// rules, are the engine's (so its errors read as on the direct path).
fn check_name(s: &str) -> Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
    };
    let ok = match s.split_once('@') {
        None => part_ok(s),
        Some((v, snap)) => part_ok(v) && part_ok(snap),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{}' is not a valid name (letters, digits, '.', '_', '-'; VOL@SNAP for a snapshot)",
            s.chars().take(64).collect::<String>()
        ))
    }
}

fn check_socket(p: &Path) -> Result<(), String> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(format!("socket '{}' is not an absolute path", p.display()))
    }
}

impl Request {
    /// What serde cannot say: names, absolute socket paths, queue counts.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Request::Snapshot { name } => {
                check_name(name)?;
                if !name.contains('@') {
                    return Err(format!("'{name}' is not a snapshot name; use VOL@SNAP"));
                }
                Ok(())
            }
            Request::Add {
                name,
                socket,
                queues,
                ..
            } => {
                check_name(name)?;
                check_socket(socket)?;
                if !(1..=64).contains(queues) {
                    return Err(format!("{queues} queues: use 1 to 64"));
                }
                Ok(())
            }
            Request::AddNbd { name, socket } => {
                check_name(name)?;
                check_socket(socket)
            }
            Request::Remove { name, socket } => {
                check_name(name)?;
                socket.as_deref().map_or(Ok(()), check_socket)
            }
            Request::Create { name, .. }
            | Request::Resize { name, .. }
            | Request::Delete { name, .. }
            | Request::Base {
                name,
                new_name: None,
            } => check_name(name),
            Request::Base {
                name,
                new_name: Some(new),
            } => check_name(name).and_then(|_| check_name(new)),
            Request::Rename { old, new } => check_name(old).and_then(|_| check_name(new)),
            Request::Rollback { snapshot, .. } => check_name(snapshot),
            Request::Clone { source, new } => check_name(source).and_then(|_| check_name(new)),
            Request::Grow {} | Request::List {} | Request::Status {} | Request::Policy { .. } => {
                Ok(())
            }
        }
    }

    /// The request as its line on the wire (without the newline).
    pub fn to_line(&self) -> String {
        // Serialising these types (strings, numbers, paths made of UTF-8
        // by serde's check) cannot fail but for a non-UTF-8 path, which a
        // client would have no way to send: say so as the line itself.
        serde_json::to_string(self).unwrap_or_else(|e| format!("unencodable request: {e}"))
    }
}

/// Parses one request line (without its newline). Pure; every malformed
/// line is an `Err` with the text of the error reply.
pub fn parse_request(line: &str) -> Result<Request, String> {
    if line.trim().is_empty() {
        return Err(format!(
            "empty request: send one JSON object per line, with \"op\" one of {COMMANDS}"
        ));
    }
    let req: Request = serde_json::from_str(line).map_err(|e| {
        let e = e.to_string();
        format!(
            "not a request ({}); \"op\" is one of {COMMANDS}",
            e.chars().take(300).collect::<String>()
        )
    })?;
    req.check()?;
    Ok(req)
}

/// Changes to the pool policy (`policy` request); a missing field keeps
/// the current value. The fields are the raw [`Policy`] values:
/// `data_warn_pct` and `meta_warn_pct` three percentages (0 for an unused
/// slot), `when_full` 0 or 1, `queue_timeout_ms`, `max_overcommit_pct`.
/// The engine validates the policy that results.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_warn_pct: Option<[u8; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_warn_pct: Option<[u8; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when_full: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_overcommit_pct: Option<u32>,
}

impl PolicyChange {
    /// `p` with the changes made.
    pub fn apply(&self, mut p: Policy) -> Policy {
        if let Some(t) = self.data_warn_pct {
            p.data_warn_pct = t;
        }
        if let Some(t) = self.meta_warn_pct {
            p.meta_warn_pct = t;
        }
        if let Some(w) = self.when_full {
            p.when_full = w;
        }
        if let Some(ms) = self.queue_timeout_ms {
            p.queue_timeout_ms = ms;
        }
        if let Some(pct) = self.max_overcommit_pct {
            p.max_overcommit_pct = pct;
        }
        p
    }

    /// The policy, if every field is set (as in a `policy` reply).
    pub fn complete(&self) -> Option<Policy> {
        Some(Policy {
            data_warn_pct: self.data_warn_pct?,
            meta_warn_pct: self.meta_warn_pct?,
            when_full: self.when_full?,
            queue_timeout_ms: self.queue_timeout_ms?,
            max_overcommit_pct: self.max_overcommit_pct?,
        })
    }

    /// Every field of `p`, as the `policy` reply carries it.
    pub fn whole(p: &Policy) -> PolicyChange {
        PolicyChange {
            data_warn_pct: Some(p.data_warn_pct),
            meta_warn_pct: Some(p.meta_warn_pct),
            when_full: Some(p.when_full),
            queue_timeout_ms: Some(p.queue_timeout_ms),
            max_overcommit_pct: Some(p.max_overcommit_pct),
        }
    }
}

/// A reply line: `{"ok": {"kind": ..., ...}}` or `{"error": "text"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Answer),
    Error(String),
}

/// What a request that succeeded did, one kind per request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Answer {
    SnapshotCreated {
        name: String,
        mapped_bytes: u64,
    },
    Grown {
        size_bytes: u64,
    },
    /// `add` and `add-nbd`: what is served now, in words.
    Serving {
        message: String,
    },
    /// `remove`: one summary per connection stopped.
    Stopped {
        summaries: Vec<String>,
    },
    Served {
        volumes: Vec<ServedVolume>,
    },
    Status(PoolFigures),
    Created {
        name: String,
        size_bytes: u64,
    },
    Resized {
        name: String,
        old_size_bytes: u64,
        size_bytes: u64,
    },
    Deleted {
        name: String,
        snapshot: bool,
        /// The snapshots removed with a volume.
        snapshots: Vec<String>,
    },
    Renamed {
        old: String,
        new: String,
    },
    RolledBack {
        snapshot: String,
        /// The newer snapshots removed.
        removed: Vec<String>,
    },
    Cloned {
        name: String,
        size_bytes: u64,
        mapped_bytes: u64,
    },
    Based {
        name: String,
    },
    /// The whole policy now.
    Policy {
        policy: PolicyChange,
    },
}

/// A volume the daemon serves, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedVolume {
    pub name: String,
    pub socket: PathBuf,
    /// `vhost-user` or `nbd`.
    pub transport: String,
}

/// The pool's figures, as `thinctl pool status` prints them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolFigures {
    pub size_bytes: u64,
    pub data_bytes: u64,
    pub data_used_bytes: u64,
    pub data_free_bytes: u64,
    pub data_used_pct: u8,
    pub metadata_used_pct: u8,
    pub volumes: u64,
    pub snapshots: u64,
    pub bases: u64,
    pub clones: u64,
    pub provisioned_bytes: u64,
    pub thresholds_crossed: Vec<String>,
    /// Volumes served (vhost-user sockets).
    pub served: usize,
}

impl Reply {
    /// The reply as its line on the wire (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!("{{\"error\":\"unencodable reply: {e}\"}}"))
    }
}

/// Sends one request to the control socket at `control`; the daemon's
/// answer, or its error text. The outer error is a failure to talk to the
/// socket at all, or a reply this client cannot read.
pub fn request(control: &Path, req: &Request) -> io::Result<Result<Answer, String>> {
    let mut s = UnixStream::connect(control)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(req.to_line().as_bytes())?;
    s.write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(s.take(1 << 20)).read_line(&mut reply)?;
    match serde_json::from_str::<Reply>(reply.trim_end()) {
        Ok(Reply::Ok(a)) => Ok(Ok(a)),
        Ok(Reply::Error(e)) => Ok(Err(e)),
        Err(e) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unexpected reply from {} ({e}): '{}'",
                control.display(),
                reply.trim_end().chars().take(200).collect::<String>()
            ),
        )),
    }
}

/// Reads one request line of at most [`MAX_LINE`] bytes. A line too long
/// or not UTF-8 is `InvalidData` (answered with an error line).
pub(super) fn read_request(stream: &UnixStream) -> io::Result<String> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::new();
    BufReader::new(stream.take(MAX_LINE as u64 + 1)).read_until(b'\n', &mut buf)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request line longer than {MAX_LINE} bytes"),
        ));
    }
    String::from_utf8(buf)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(json: &str) -> Result<Request, String> {
        parse_request(json)
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            line(r#"{"op":"snapshot","name":"vm-1@s1"}"#),
            Ok(Request::Snapshot {
                name: "vm-1@s1".into()
            })
        );
        assert_eq!(
            line(r#" {"op":"add","name":"vm-1","socket":"/run/a.sock","queues":4} "#),
            Ok(Request::Add {
                name: "vm-1".into(),
                socket: "/run/a.sock".into(),
                queues: 4,
                incoming: false,
            })
        );
        assert_eq!(
            line(r#"{"op":"add","name":"vm-1","socket":"/run/a.sock"}"#),
            Ok(Request::Add {
                name: "vm-1".into(),
                socket: "/run/a.sock".into(),
                queues: 1,
                incoming: false,
            })
        );
        assert_eq!(
            line(r#"{"op":"add-nbd","name":"vm-1@s","socket":"/run/nbd.sock"}"#),
            Ok(Request::AddNbd {
                name: "vm-1@s".into(),
                socket: "/run/nbd.sock".into(),
            })
        );
        assert_eq!(
            line(r#"{"op":"remove","name":"vm-1"}"#),
            Ok(Request::Remove {
                name: "vm-1".into(),
                socket: None
            })
        );
        assert_eq!(line(r#"{"op":"list"}"#), Ok(Request::List {}));
        assert_eq!(line(r#"{"op":"status"}"#), Ok(Request::Status {}));
        assert_eq!(
            line(r#"{"op":"policy","change":{"when_full":1,"data_warn_pct":[0,70,80]}}"#),
            Ok(Request::Policy {
                change: PolicyChange {
                    data_warn_pct: Some([0, 70, 80]),
                    when_full: Some(1),
                    ..PolicyChange::default()
                }
            })
        );
        for bad in [
            "",
            "   ",
            "list",
            "snapshot vm-1@s1",
            "{}",
            "[]",
            "null",
            r#"{"op":"bogus"}"#,
            r#"{"op":"list","please":1}"#,
            r#"{"op":"grow","now":true}"#,
            r#"{"op":"snapshot"}"#,
            r#"{"op":"snapshot","name":"vm-1"}"#,
            r#"{"op":"snapshot","name":"a@b c"}"#,
            r#"{"op":"snapshot","name":"vm-1@s","extra":1}"#,
            r#"{"op":"add","name":"vm-1","socket":"rel.sock"}"#,
            r#"{"op":"add","name":"vm-1","socket":"/a.sock","queues":0}"#,
            r#"{"op":"add","name":"vm-1","socket":"/a.sock","queues":65}"#,
            r#"{"op":"add","name":"vm-1","socket":"/a.sock","queues":"x"}"#,
            r#"{"op":"add","name":"vm-1","socket":"/a.sock","queues":70000}"#,
            r#"{"op":"remove","name":"a","socket":"b"}"#,
            r#"{"op":"create","name":"vm-1","bytes":-1}"#,
            r#"{"op":"create","name":"vm-1","bytes":18446744073709551616}"#,
            r#"{"op":"create","name":"vm/1","bytes":4096}"#,
            r#"{"op":"create","name":"vmé","bytes":4096}"#,
            r#"{"op":"delete","name":"vm-1@"}"#,
            r#"{"op":"delete","name":"../x"}"#,
            r#"{"op":"rename","old":"a","new":"b/c"}"#,
            r#"{"op":"clone","source":"a$","new":"b"}"#,
            r#"{"op":"base","name":"vm-1","new_name":"b c"}"#,
            r#"{"op":"policy","change":{"when_full":256}}"#,
            r#"{"op":"policy","change":{"data_warn_pct":[80,90]}}"#,
            r#"{"op":"policy","change":{"data_warn_pct":[80,90,95,99]}}"#,
            r#"{"op":"policy","change":{"queue_timeout_ms":-1}}"#,
            r#"{"op":"policy","change":{"bogus":1}}"#,
            "\u{0}\u{1}",
        ] {
            match line(bad) {
                Err(e) => assert!(!e.is_empty() && !e.contains('\n'), "{bad:?}: {e:?}"),
                Ok(r) => panic!("{bad:?} accepted as {r:?}"),
            }
        }
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let reqs = [
            Request::Snapshot { name: "v@s".into() },
            Request::Grow {},
            Request::Add {
                name: "v".into(),
                socket: "/s".into(),
                queues: 2,
                incoming: true,
            },
            Request::Remove {
                name: "v".into(),
                socket: Some("/s".into()),
            },
            Request::Create {
                name: "v".into(),
                bytes: u64::MAX,
                force: true,
            },
            Request::Base {
                name: "v".into(),
                new_name: Some("b".into()),
            },
            Request::Policy {
                change: PolicyChange {
                    max_overcommit_pct: Some(0),
                    ..PolicyChange::default()
                },
            },
        ];
        for r in reqs {
            assert_eq!(parse_request(&r.to_line()), Ok(r));
        }
        let replies = [
            Reply::Error("no such volume 'x'".into()),
            Reply::Ok(Answer::Deleted {
                name: "v".into(),
                snapshot: false,
                snapshots: vec!["v@a".into()],
            }),
            Reply::Ok(Answer::Policy {
                policy: PolicyChange::whole(&Policy {
                    data_warn_pct: [0, 70, 80],
                    meta_warn_pct: [80, 90, 95],
                    when_full: 1,
                    queue_timeout_ms: 30_000,
                    max_overcommit_pct: 250,
                }),
            }),
        ];
        for r in replies {
            let l = r.to_line();
            assert!(!l.contains('\n'));
            assert_eq!(serde_json::from_str::<Reply>(&l).unwrap(), r);
        }
    }

    #[test]
    fn policy_changes_apply() {
        let p = Policy {
            data_warn_pct: [0, 70, 80],
            meta_warn_pct: [80, 90, 95],
            when_full: 1,
            queue_timeout_ms: 30_000,
            max_overcommit_pct: 250,
        };
        assert_eq!(PolicyChange::whole(&p).complete(), Some(p));
        // A partial change keeps the other fields, and is not a policy.
        let c = PolicyChange {
            max_overcommit_pct: Some(0),
            ..PolicyChange::default()
        };
        assert_eq!(c.complete(), None);
        let q = c.apply(p);
        assert_eq!(q.max_overcommit_pct, 0);
        assert_eq!(q.data_warn_pct, p.data_warn_pct);
        assert_eq!(q.queue_timeout_ms, p.queue_timeout_ms);
    }

    #[test]
    fn random_lines_never_panic() {
        let pieces = [
            "{",
            "}",
            "\"op\"",
            ":",
            ",",
            "\"snapshot\"",
            "\"add\"",
            "\"policy\"",
            "\"name\"",
            "\"v@s\"",
            "\"change\"",
            "[",
            "]",
            "1",
            "-1",
            "null",
            "\"/x\"",
            "\"socket\"",
            "\"queues\"",
            "true",
        ];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 12) as usize;
            let l: String = (0..n)
                .map(|i| pieces[((x >> (i * 5)) % pieces.len() as u64) as usize])
                .collect();
            let _ = parse_request(&l);
        }
    }

    #[test]
    fn control_path_follows_pool() {
        let dir = std::env::temp_dir().join(format!("thinlun-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pool = dir.join("pool.img");
        std::fs::write(&pool, b"").unwrap();
        let canon = std::fs::canonicalize(&pool).unwrap();
        assert_eq!(
            default_control_path(&pool),
            PathBuf::from(format!("{}.ctl", canon.display()))
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            default_control_path(Path::new("/dev/null")),
            PathBuf::from("/run/thinlun/dev-null.ctl")
        );
    }
}
