//! The control-socket protocol: the request grammar (tabled in the
//! [module doc](super)), its parser, and both ends of the wire: the
//! client's [`request`] and the daemon's reading of a request line. Kept
//! apart from the [`Daemon`](super::Daemon) so that clients such as
//! `thinctl` use the grammar without the serving side, and so that the
//! parsing, which is pure, is tested on its own.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thinlun::format::superblock::Policy;

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

/// A parsed control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Snapshot(String),
    /// Grow the pool onto its grown file or LUN.
    Grow,
    Add {
        name: String,
        socket: PathBuf,
        queues: u16,
        /// For the target of a live migration: open the volume only when
        /// the front end starts the rings.
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
        socket: Option<PathBuf>,
    },
    List,
    Status,
    /// A thin volume; `force` passes the overcommit limit.
    Create {
        name: String,
        bytes: u64,
        force: bool,
    },
    /// `force` allows shrinking.
    Resize {
        name: String,
        bytes: u64,
        force: bool,
    },
    /// Remove a volume or snapshot from the pool.
    Delete {
        name: String,
        recursive: bool,
    },
    Rename {
        old: String,
        new: String,
    },
    /// `force` removes the snapshots newer than the one rolled back to.
    Rollback {
        snapshot: String,
        force: bool,
    },
    Clone {
        source: String,
        new: String,
    },
    Base {
        name: String,
        new_name: Option<String>,
    },
    Policy(PolicyChange),
}

const COMMANDS: &str = "snapshot, grow, add, remove, list, status, create, resize, delete, \
                        rename, rollback, clone, base, policy";

/// Checks a volume or snapshot name word: one or two (`VOL@SNAP`) parts
/// of `A-Za-z0-9._-`. Whether a snapshot may stand there, and the finer
/// rules, are the engine's (so its errors read as on the direct path).
fn name_arg(s: &str) -> Result<String, String> {
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
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{}' is not a valid name (letters, digits, '.', '_', '-'; VOL@SNAP for a snapshot)",
            s.chars().take(64).collect::<String>()
        ))
    }
}

fn bytes_arg(s: &str) -> Result<u64, String> {
    s.parse::<u64>().map_err(|_| {
        format!(
            "'{}' is not a size in bytes",
            s.chars().take(64).collect::<String>()
        )
    })
}

/// Parses one request line (without its newline). Pure; every malformed
/// line is an `Err` with the text of the error reply.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let usage = |u: &str| Err(format!("usage: {u}"));
    match words.as_slice() {
        [] => Err(format!("empty request (commands: {COMMANDS})")),
        ["snapshot", spec] => {
            if !spec.contains('@') {
                return Err(format!("'{spec}' is not a snapshot name; use VOL@SNAP"));
            }
            Ok(Request::Snapshot(spec.to_string()))
        }
        ["snapshot", ..] => usage("snapshot VOL@SNAP"),
        ["add", name, socket] | ["add", name, socket, _] | ["add", name, socket, _, "incoming"] => {
            let queues = match words.get(3) {
                None => 1,
                Some(q) => match q.parse::<u16>() {
                    Ok(n @ 1..=64) => n,
                    _ => return Err(format!("'{q}' queues: use 1 to 64")),
                },
            };
            if !socket.starts_with('/') {
                return Err(format!("socket '{socket}' is not an absolute path"));
            }
            Ok(Request::Add {
                name: name.to_string(),
                socket: PathBuf::from(socket),
                queues,
                incoming: words.len() == 5,
            })
        }
        ["add", ..] => usage("add VOL SOCKET [QUEUES [incoming]]"),
        ["add-nbd", name, socket] => {
            if !socket.starts_with('/') {
                return Err(format!("socket '{socket}' is not an absolute path"));
            }
            Ok(Request::AddNbd {
                name: name.to_string(),
                socket: PathBuf::from(socket),
            })
        }
        ["add-nbd", ..] => usage("add-nbd VOL SOCKET"),
        ["remove", name] => Ok(Request::Remove {
            name: name.to_string(),
            socket: None,
        }),
        ["remove", name, socket] => {
            if !socket.starts_with('/') {
                return Err(format!("socket '{socket}' is not an absolute path"));
            }
            Ok(Request::Remove {
                name: name.to_string(),
                socket: Some(PathBuf::from(socket)),
            })
        }
        ["remove", ..] => usage("remove VOL [SOCKET]"),
        ["list"] => Ok(Request::List),
        ["grow"] => Ok(Request::Grow),
        ["status"] => Ok(Request::Status),
        ["list" | "status" | "grow", ..] => Err(format!("'{}' takes no arguments", words[0])),
        [cmd @ ("create" | "resize"), name, bytes]
        | [cmd @ ("create" | "resize"), name, bytes, "force"] => {
            let (name, bytes) = (name_arg(name)?, bytes_arg(bytes)?);
            let force = words.len() == 4;
            Ok(if *cmd == "create" {
                Request::Create { name, bytes, force }
            } else {
                Request::Resize { name, bytes, force }
            })
        }
        ["create", ..] => usage("create VOL BYTES [force]"),
        ["resize", ..] => usage("resize VOL BYTES [force]"),
        ["delete", name] | ["delete", name, "recursive"] => Ok(Request::Delete {
            name: name_arg(name)?,
            recursive: words.len() == 3,
        }),
        ["delete", ..] => usage("delete VOL[@SNAP] [recursive]"),
        ["rename", old, new] => Ok(Request::Rename {
            old: name_arg(old)?,
            new: name_arg(new)?,
        }),
        ["rename", ..] => usage("rename OLD NEW"),
        ["rollback", snap] | ["rollback", snap, "force"] => Ok(Request::Rollback {
            snapshot: name_arg(snap)?,
            force: words.len() == 3,
        }),
        ["rollback", ..] => usage("rollback VOL@SNAP [force]"),
        ["clone", source, new] => Ok(Request::Clone {
            source: name_arg(source)?,
            new: name_arg(new)?,
        }),
        ["clone", ..] => usage("clone SRC NEW"),
        ["base", name] | ["base", name, _] => Ok(Request::Base {
            name: name_arg(name)?,
            new_name: words.get(2).map(|n| name_arg(n)).transpose()?,
        }),
        ["base", ..] => usage("base VOL [NEW]"),
        ["policy", pairs @ ..] => PolicyChange::parse(pairs).map(Request::Policy),
        [cmd, ..] => Err(format!(
            "unknown command '{}' (commands: {COMMANDS})",
            cmd.chars().take(64).collect::<String>()
        )),
    }
}

/// Changes to the pool policy (`policy` request); `None` keeps the
/// current value. On the wire each set field is a `KEY=VALUE` word with the
/// raw [`Policy`] value: `data_warn_pct=A,B,C` and `meta_warn_pct=A,B,C`
/// (three percentages, 0 for an unused slot), `when_full=0|1`,
/// `queue_timeout_ms=N`, `max_overcommit_pct=N`. The engine validates the
/// policy that results.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyChange {
    pub data_warn_pct: Option<[u8; 3]>,
    pub meta_warn_pct: Option<[u8; 3]>,
    pub when_full: Option<u8>,
    pub queue_timeout_ms: Option<u32>,
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

    /// The request line that asks for this change.
    pub fn request_line(&self) -> String {
        let mut line = "policy".to_string();
        let three = |t: [u8; 3]| format!("{},{},{}", t[0], t[1], t[2]);
        if let Some(t) = self.data_warn_pct {
            line.push_str(&format!(" data_warn_pct={}", three(t)));
        }
        if let Some(t) = self.meta_warn_pct {
            line.push_str(&format!(" meta_warn_pct={}", three(t)));
        }
        if let Some(w) = self.when_full {
            line.push_str(&format!(" when_full={w}"));
        }
        if let Some(ms) = self.queue_timeout_ms {
            line.push_str(&format!(" queue_timeout_ms={ms}"));
        }
        if let Some(pct) = self.max_overcommit_pct {
            line.push_str(&format!(" max_overcommit_pct={pct}"));
        }
        line
    }

    /// Parses `KEY=VALUE` words, each key at most once (none: no change).
    pub fn parse(words: &[&str]) -> Result<PolicyChange, String> {
        fn set<T>(slot: &mut Option<T>, key: &str, v: T) -> Result<(), String> {
            match slot.replace(v) {
                None => Ok(()),
                Some(_) => Err(format!("'{key}' given twice")),
            }
        }
        let mut c = PolicyChange::default();
        for w in words {
            let shown = || w.chars().take(64).collect::<String>();
            let (key, value) = w
                .split_once('=')
                .ok_or_else(|| format!("'{}' is not KEY=VALUE", shown()))?;
            let bad = || format!("'{}': bad value", shown());
            let three = || -> Result<[u8; 3], String> {
                let v: Vec<u8> = value
                    .split(',')
                    .map(|x| x.parse::<u8>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad())?;
                <[u8; 3]>::try_from(v).map_err(|_| bad())
            };
            match key {
                "data_warn_pct" => set(&mut c.data_warn_pct, key, three()?)?,
                "meta_warn_pct" => set(&mut c.meta_warn_pct, key, three()?)?,
                "when_full" => set(&mut c.when_full, key, value.parse().map_err(|_| bad())?)?,
                "queue_timeout_ms" => set(
                    &mut c.queue_timeout_ms,
                    key,
                    value.parse().map_err(|_| bad())?,
                )?,
                "max_overcommit_pct" => set(
                    &mut c.max_overcommit_pct,
                    key,
                    value.parse().map_err(|_| bad())?,
                )?,
                _ => {
                    return Err(format!(
                        "unknown policy key '{}' (keys: data_warn_pct, meta_warn_pct, \
                         when_full, queue_timeout_ms, max_overcommit_pct)",
                        shown()
                    ))
                }
            }
        }
        Ok(c)
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

/// Sends one request to the control socket at `control`; the reply's
/// text, `Ok` for `ok`, `Err` for `error`. The outer error is a failure
/// to talk to the socket at all.
pub fn request(control: &Path, line: &str) -> io::Result<Result<String, String>> {
    let mut s = UnixStream::connect(control)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(line.as_bytes())?;
    s.write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(s.take(64 * 1024)).read_line(&mut reply)?;
    let reply = reply.trim_end_matches(['\r', '\n']);
    if let Some(t) = reply.strip_prefix("ok") {
        Ok(Ok(t.trim_start().to_string()))
    } else if let Some(t) = reply.strip_prefix("error") {
        Ok(Err(t.trim_start().to_string()))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply from {}: '{reply}'", control.display()),
        ))
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

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request("snapshot vm-1@s1"),
            Ok(Request::Snapshot("vm-1@s1".into()))
        );
        assert_eq!(
            parse_request("  add vm-1 /run/a.sock 4 "),
            Ok(Request::Add {
                name: "vm-1".into(),
                socket: "/run/a.sock".into(),
                queues: 4,
                incoming: false,
            })
        );
        assert_eq!(
            parse_request("add vm-1 /run/a.sock"),
            Ok(Request::Add {
                name: "vm-1".into(),
                socket: "/run/a.sock".into(),
                queues: 1,
                incoming: false,
            })
        );
        assert_eq!(
            parse_request("add vm-1 /run/a.sock 2 incoming"),
            Ok(Request::Add {
                name: "vm-1".into(),
                socket: "/run/a.sock".into(),
                queues: 2,
                incoming: true,
            })
        );
        assert_eq!(
            parse_request("add-nbd vm-1@s /run/nbd.sock"),
            Ok(Request::AddNbd {
                name: "vm-1@s".into(),
                socket: "/run/nbd.sock".into(),
            })
        );
        assert_eq!(
            parse_request("remove vm-1"),
            Ok(Request::Remove {
                name: "vm-1".into(),
                socket: None
            })
        );
        assert_eq!(
            parse_request("remove vm-1 /run/a.sock"),
            Ok(Request::Remove {
                name: "vm-1".into(),
                socket: Some("/run/a.sock".into())
            })
        );
        assert_eq!(parse_request("list"), Ok(Request::List));
        assert_eq!(parse_request("status"), Ok(Request::Status));
        for bad in [
            "",
            "   ",
            "snapshot",
            "snapshot vm-1",
            "snapshot a@b c",
            "add",
            "add vm-1",
            "add vm-1 rel.sock",
            "add vm-1 /a.sock 0",
            "add vm-1 /a.sock 65",
            "add vm-1 /a.sock x",
            "add vm-1 /a.sock 1 2",
            "add vm-1 /a.sock 1 incoming x",
            "add-nbd vm-1",
            "add-nbd vm-1 rel.sock",
            "remove",
            "remove a b",
            "remove a /b c",
            "list x",
            "status x",
            "bogus",
            "\u{0}\u{1}",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_pool_changes() {
        let ok = |line: &str, want: Request| assert_eq!(parse_request(line), Ok(want), "{line}");
        ok(
            "create vm-1 4096",
            Request::Create {
                name: "vm-1".into(),
                bytes: 4096,
                force: false,
            },
        );
        ok(
            "create a.b_c 0 force",
            Request::Create {
                name: "a.b_c".into(),
                bytes: 0,
                force: true,
            },
        );
        ok(
            "resize vm-1 8192 force",
            Request::Resize {
                name: "vm-1".into(),
                bytes: 8192,
                force: true,
            },
        );
        ok(
            "resize vm-1 18446744073709551615",
            Request::Resize {
                name: "vm-1".into(),
                bytes: u64::MAX,
                force: false,
            },
        );
        ok(
            "delete vm-1",
            Request::Delete {
                name: "vm-1".into(),
                recursive: false,
            },
        );
        ok(
            "delete vm-1@s1 recursive",
            Request::Delete {
                name: "vm-1@s1".into(),
                recursive: true,
            },
        );
        ok(
            "rename vm-1 vm-2",
            Request::Rename {
                old: "vm-1".into(),
                new: "vm-2".into(),
            },
        );
        ok(
            "rename vm-1@a b",
            Request::Rename {
                old: "vm-1@a".into(),
                new: "b".into(),
            },
        );
        ok(
            "rollback vm-1@s1",
            Request::Rollback {
                snapshot: "vm-1@s1".into(),
                force: false,
            },
        );
        ok(
            "rollback vm-1@s1 force",
            Request::Rollback {
                snapshot: "vm-1@s1".into(),
                force: true,
            },
        );
        ok(
            "clone vm-1@s1 c1",
            Request::Clone {
                source: "vm-1@s1".into(),
                new: "c1".into(),
            },
        );
        ok(
            "clone base-1 c1",
            Request::Clone {
                source: "base-1".into(),
                new: "c1".into(),
            },
        );
        ok(
            "base vm-1",
            Request::Base {
                name: "vm-1".into(),
                new_name: None,
            },
        );
        ok(
            "base vm-1 base-1",
            Request::Base {
                name: "vm-1".into(),
                new_name: Some("base-1".into()),
            },
        );
        ok("policy", Request::Policy(PolicyChange::default()));
        ok(
            "policy when_full=1 data_warn_pct=0,70,80",
            Request::Policy(PolicyChange {
                data_warn_pct: Some([0, 70, 80]),
                when_full: Some(1),
                ..PolicyChange::default()
            }),
        );
        for bad in [
            "create",
            "create vm-1",
            "create vm-1 -1",
            "create vm-1 1M",
            "create vm-1 18446744073709551616",
            "create vm-1 4096 forc",
            "create vm-1 4096 force x",
            "create vm/1 4096",
            "create 'vm' 4096",
            "create vm\u{e9} 4096",
            "resize",
            "resize vm-1",
            "resize vm-1 x",
            "resize vm-1 4096 recursive",
            "resize @ 4096",
            "delete",
            "delete vm-1 force",
            "delete vm-1 recursive x",
            "delete vm-1@",
            "delete @s",
            "delete a@b@c",
            "delete ../x",
            "rename",
            "rename a",
            "rename a b c",
            "rename a b/c",
            "rollback",
            "rollback vm-1@s1 recursive",
            "rollback vm-1@s1 force x",
            "rollback vm-1@",
            "clone",
            "clone a",
            "clone a b c",
            "clone a$ b",
            "base",
            "base vm-1 b c",
            "policy when_full",
            "policy when_full=",
            "policy when_full=x",
            "policy when_full=256",
            "policy when_full=1 when_full=0",
            "policy data_warn_pct=80,90",
            "policy data_warn_pct=80,90,95,99",
            "policy data_warn_pct=80,x,95",
            "policy meta_warn_pct=300,0,0",
            "policy queue_timeout_ms=-1",
            "policy max_overcommit_pct=4294967296",
            "policy bogus=1",
            "policy =1",
        ] {
            match parse_request(bad) {
                Err(e) => assert!(!e.is_empty() && !e.contains('\n'), "{bad:?}: {e:?}"),
                Ok(r) => panic!("{bad:?} accepted as {r:?}"),
            }
        }
    }

    #[test]
    fn policy_change_round_trips() {
        let p = Policy {
            data_warn_pct: [0, 70, 80],
            meta_warn_pct: [80, 90, 95],
            when_full: 1,
            queue_timeout_ms: 30_000,
            max_overcommit_pct: 250,
        };
        let line = PolicyChange::whole(&p).request_line();
        let Ok(Request::Policy(c)) = parse_request(&line) else {
            panic!("{line} not parsed");
        };
        assert_eq!(c.complete(), Some(p));
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
        assert_eq!(
            parse_request(&c.request_line()),
            Ok(Request::Policy(c.clone()))
        );
    }

    #[test]
    fn random_lines_never_panic() {
        let words = [
            "snapshot",
            "add",
            "remove",
            "list",
            "status",
            "create",
            "resize",
            "delete",
            "rename",
            "rollback",
            "clone",
            "base",
            "policy",
            "force",
            "recursive",
            "when_full=1",
            "@",
            "/",
            "1",
            "99",
            "x@y",
        ];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 6) as usize;
            let line: Vec<&str> = (0..n)
                .map(|i| words[((x >> (i * 5)) % words.len() as u64) as usize])
                .collect();
            let _ = parse_request(&line.join(" "));
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
