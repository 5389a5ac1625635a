//! `thinctl daemon`: many volumes of one pool served from one process,
//! added and removed at run time through its control socket, snapshots of
//! served volumes taken by `thinctl snapshot` through that socket, and bad
//! control input answered with error lines. The volumes are driven by a
//! real vhost-user front end without a VM (`virtio-driver`, the client of
//! `common/vhost.rs`, shared with `vhost_client.rs`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use thinlun::{OpenOptions, Pool};

mod common;
use common::daemon::*;
use common::vhost::*;

/// Sends raw bytes to the control socket (closing the write side when
/// `close` is set) and returns the reply line.
fn raw_request(control: &Path, bytes: &[u8], close: bool) -> String {
    let mut s = UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // A long line may be answered (and the connection closed) before all
    // of it was written: that is fine.
    let _ = s.write_all(bytes);
    if close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = String::new();
    BufReader::new(&mut s).read_line(&mut reply).unwrap();
    reply
}

/// The volumes a daemon serves, as (name, socket), from its `list`.
fn served_list(control: &Path) -> Vec<(String, String)> {
    let reply = raw_request(control, b"{\"op\":\"list\"}\n", false);
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(v["ok"]["kind"], "served", "{reply}");
    v["ok"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["socket"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// An error reply: one line, `{"error": "..."}`.
fn is_error_line(reply: &str) -> bool {
    reply.ends_with('\n')
        && reply.lines().count() == 1
        && serde_json::from_str::<serde_json::Value>(reply).is_ok_and(|v| v["error"].is_string())
}

/// Reads `len` bytes at byte offset `off` of a volume or snapshot of a
/// closed pool.
fn read_back(pool: &Path, name: &str, off: u64, len: usize) -> Vec<u8> {
    let p = Pool::open_path(
        pool,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let v = p.open_volume(name).unwrap();
    let mut buf = vec![0u8; len];
    v.read(off / 512, &mut buf).unwrap();
    drop(v);
    drop(p);
    buf
}

const LEN: usize = 256 << 10;

#[test]
fn daemon_serves_volumes_added_at_run_time_and_snapshots_them() {
    let lab = Lab::new("daemon");
    lab.ctl(&["create", "vol-a", "64M"]);
    lab.ctl(&["create", "vol-b", "64M"]);
    // Past a 1 % warning threshold before the daemon starts: it must log
    // the crossing once, not once a second.
    lab.ctl(&["pool", "set", "--data-thresholds", "1"]);
    let filler = lab.path("filler.raw");
    std::fs::write(&filler, vec![0x11u8; 4 << 20]).unwrap();
    lab.ctl(&["import", "filler", filler.to_str().unwrap()]);
    let daemon = lab.start(&["daemon"]);
    let ctl = lab.control();

    // Nothing served yet; two volumes added at run time.
    assert_eq!(served_list(&ctl), vec![]);
    let (sa, sb) = (lab.path("a.sock"), lab.path("b.sock"));
    let out = lab.ctl(&["serve-add", "vol-a", "--socket", sa.to_str().unwrap()]);
    assert!(out.contains("serving vol-a"), "{out}");
    lab.ctl(&[
        "serve-add",
        "vol-b",
        "--socket",
        sb.to_str().unwrap(),
        "--queues",
        "2",
    ]);
    assert!(sa.exists() && sb.exists());
    let sock = |p: &Path| p.display().to_string();
    assert_eq!(
        served_list(&ctl),
        vec![
            ("vol-a".to_string(), sock(&sa)),
            ("vol-b".to_string(), sock(&sb))
        ]
    );
    // The same volume twice, an unknown volume, another's socket: refused.
    let e = lab.ctl_fails(&[
        "serve-add",
        "vol-a",
        "--socket",
        lab.path("c.sock").to_str().unwrap(),
    ]);
    assert!(e.contains("already served"), "{e}");
    let e = lab.ctl_fails(&[
        "serve-add",
        "nope",
        "--socket",
        lab.path("c.sock").to_str().unwrap(),
    ]);
    assert!(e.contains("not found"), "{e}");
    let e = lab.ctl_fails(&["serve-add", "vol-b", "--socket", sa.to_str().unwrap()]);
    assert!(
        e.contains("socket of 'vol-a'") || e.contains("already served"),
        "{e}"
    );

    // Write to both through vhost-user.
    let mut ca = Client::connect(&sa, 1);
    let mut cb = Client::connect(&sb, 2);
    let before = pattern(1, LEN);
    ca.data(0, LEN).copy_from_slice(&before);
    assert_eq!(ca.write(0, 0, LEN), S_OK);
    let b_data = pattern(2, LEN);
    cb.data(0, LEN).copy_from_slice(&b_data);
    assert_eq!(cb.write(2048, 0, LEN), S_OK);

    // A snapshot of the served volume, taken by the daemon for thinctl.
    let out = lab.ctl(&["snapshot", "vol-a@s1"]);
    assert!(
        out.contains("created snapshot 'vol-a@s1'") && out.contains("serving the pool"),
        "{out}"
    );
    // Taking it again fails with the engine's reason, through the socket.
    let e = lab.ctl_fails(&["snapshot", "vol-a@s1"]);
    assert!(e.contains("already exists"), "{e}");

    let crossings = lab
        .log()
        .matches("crossed the 1% warning threshold")
        .count();
    assert_eq!(crossings, 1, "daemon log:\n{}", lab.log());

    // The pool file grows while served: the daemon grows the pool.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lab.pool)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let out = lab.ctl(&["pool", "grow"]);
    assert!(
        out.contains("to 512M") && out.contains("serving it"),
        "{out}"
    );
    let e = lab.ctl_fails(&["pool", "grow"]);
    assert!(e.contains("nothing to grow"), "{e}");

    // Writes after the snapshot: half the old range, and a new range.
    let after = pattern(3, LEN);
    ca.data(LEN, LEN).copy_from_slice(&after);
    assert_eq!(ca.write(LEN as u64 / 1024, LEN, LEN / 2), S_OK); // at byte LEN/2
    assert_eq!(ca.write(8192, LEN, LEN), S_OK); // at 4 MiB
    assert_eq!(
        ca.one(T_FLUSH, 0, &[], &[Part::Header(16), Part::Status]),
        S_OK
    );
    assert_eq!(ca.read(0, 2 * LEN, LEN), S_OK);
    same(
        &ca.data(2 * LEN, LEN)[..LEN / 2],
        &before[..LEN / 2],
        "vol-a head",
    );
    same(
        &ca.data(2 * LEN, LEN)[LEN / 2..],
        &after[..LEN / 2],
        "vol-a tail",
    );

    // Bad control input: an error line each, and the daemon lives on.
    let long = vec![b'x'; 10_000];
    let status = &br#"{"op":"status"}"#[..];
    for (bytes, close) in [
        (&b"\n"[..], false),
        (b"bogus\n", false),
        (b"list\n", false),
        (br#"{"op":"add"}"# as &[u8], false),
        (
            br#"{"op":"add","name":"vol-a","socket":"relative.sock"}"#,
            false,
        ),
        (
            br#"{"op":"add","name":"vol-c","socket":"/tmp/x.sock","queues":0}"#,
            false,
        ),
        (br#"{"op":"snapshot","name":"vol-a"}"#, false),
        (br#"{"op":"snapshot","name":"nope@s"}"#, false),
        (br#"{"op":"snapshot","name":"vol-a@bad/name"}"#, false),
        (br#"{"op":"remove","name":"nope"}"#, false),
        (br#"{"op":"list","please":1}"#, false),
        (br#"{"op":"list""#, false),
        (b"\xff\xfe\x00\n", false),
        (status, true), // no newline: still one request
        (&long[..], false),
    ] {
        let mut line = bytes.to_vec();
        if !close && !line.ends_with(b"\n") {
            line.push(b'\n');
        }
        let reply = raw_request(&ctl, &line, close);
        if bytes == status {
            let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
            assert_eq!(v["ok"]["kind"], "status", "{reply}");
            assert!(
                v["ok"]["snapshots"] == 1 && v["ok"]["served"] == 2,
                "{reply}"
            );
        } else {
            assert!(
                is_error_line(&reply),
                "{:?} -> {reply:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
            );
        }
    }
    // A client that connects and says nothing, then one that talks.
    let silent = UnixStream::connect(&ctl).unwrap();
    drop(silent);
    assert_eq!(served_list(&ctl).len(), 2);

    // Removing a volume at run time (its front end still connected): the
    // socket goes, the other volume keeps working.
    let out = lab.ctl(&["serve-remove", "vol-b"]);
    assert!(out.contains("stopped vol-b"), "{out}");
    assert!(!sb.exists(), "socket of a removed volume left behind");
    drop(cb);
    let e = lab.ctl_fails(&["serve-remove", "vol-b"]);
    assert!(e.contains("not served"), "{e}");
    assert_eq!(
        served_list(&ctl),
        vec![("vol-a".to_string(), sa.display().to_string())]
    );
    assert_eq!(ca.read(8192, 2 * LEN, LEN), S_OK);
    same(ca.data(2 * LEN, LEN), &after, "vol-a after removing vol-b");
    // And it can be served again.
    lab.ctl(&["serve-add", "vol-b", "--socket", sb.to_str().unwrap()]);
    let mut cb = Client::connect(&sb, 1);
    assert_eq!(cb.read(2048, 0, LEN), S_OK);
    same(cb.data(0, LEN), &b_data, "vol-b served again");
    drop(cb);
    drop(ca);

    lab.stop(daemon, &[&sa, &sb]);

    // The snapshot holds exactly what was written before it, the volume
    // what was written after.
    let snap = read_back(&lab.pool, "vol-a@s1", 0, 2 * LEN);
    same(&snap[..LEN], &before, "snapshot");
    assert!(
        snap[LEN..].iter().all(|&b| b == 0),
        "snapshot past the data"
    );
    let snap_new = read_back(&lab.pool, "vol-a@s1", 4 << 20, LEN);
    assert!(
        snap_new.iter().all(|&b| b == 0),
        "snapshot holds a later write"
    );
    let vol = read_back(&lab.pool, "vol-a", 0, LEN);
    same(&vol[..LEN / 2], &before[..LEN / 2], "volume head");
    same(&vol[LEN / 2..], &after[..LEN / 2], "volume tail");
    same(
        &read_back(&lab.pool, "vol-a", 4 << 20, LEN),
        &after,
        "volume new range",
    );
    same(
        &read_back(&lab.pool, "vol-b", 1 << 20, LEN),
        &b_data,
        "vol-b",
    );
}

#[test]
fn serve_opens_a_control_socket_for_snapshots() {
    let lab = Lab::new("serve-ctl");
    lab.ctl(&["create", "vm-1", "16M"]);
    let sock = lab.path("vm.sock");
    let server = lab.start(&["serve", "vm-1", "--socket", sock.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1);
    let data = pattern(7, LEN);
    c.data(0, LEN).copy_from_slice(&data);
    assert_eq!(c.write(0, 0, LEN), S_OK);
    // Without a control socket the busy pool is reported as before.
    // --no-wait: a busy pool is refused at once, not after --wait's 60 s.
    let e = lab.ctl_fails(&[
        "--no-wait",
        "snapshot",
        "vm-1@x",
        "--control",
        lab.path("none.ctl").to_str().unwrap(),
    ]);
    assert!(
        e.contains("open for writing by another thinlun process"),
        "{e}"
    );
    let out = lab.ctl(&["snapshot", "vm-1@before"]);
    assert!(out.contains("created snapshot 'vm-1@before'"), "{out}");
    c.data(0, LEN).fill(0x5a);
    assert_eq!(c.write(0, 0, 4096), S_OK);
    // Other changes are asked of the serving process too; without its
    // control socket the pool is busy as before.
    let out = lab.ctl(&["create", "vm-2", "16M"]);
    assert_eq!(out, "created volume 'vm-2' (16M, 16777216 bytes)\n");
    let out = Command::new(&lab.thinctl)
        .arg("-p")
        .arg(&lab.pool)
        .args(["--no-wait", "create", "vm-3", "16M"])
        .env("THINLUN_CONTROL", lab.path("none.ctl"))
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("open for writing"),
        "{e}"
    );
    let e = lab.ctl_fails(&["remove", "vm-1", "--recursive"]);
    assert!(e.contains("volume 'vm-1' is open"), "{e}");
    lab.ctl(&["remove", "vm-2"]);
    drop(c);
    lab.stop(server, &[&sock]);
    same(
        &read_back(&lab.pool, "vm-1@before", 0, LEN),
        &data,
        "snapshot",
    );
    let vol = read_back(&lab.pool, "vm-1", 0, LEN);
    assert!(vol[..4096].iter().all(|&b| b == 0x5a));
    same(&vol[4096..], &data[4096..], "volume");
}

/// `(name, the object's text)` of each volume `thinctl list --json` shows
/// (its output has one field a line).
fn listed(lab: &Lab) -> Vec<(String, String)> {
    lab.ctl(&["list", "--json"])
        .split('}')
        .filter_map(|obj| {
            let name = field(obj, "name")?;
            Some((name.trim_matches('"').to_string(), obj.to_string()))
        })
        .collect()
}

/// The raw value of `key` in one object of `list --json`.
fn field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    obj.lines().find_map(|l| {
        let v = l.trim().strip_prefix(&format!("\"{key}\": "))?;
        Some(v.trim_end_matches(','))
    })
}

fn listed_one(lab: &Lab, name: &str) -> Option<String> {
    listed(lab).into_iter().find(|v| v.0 == name).map(|v| v.1)
}

#[test]
fn daemon_makes_pool_changes_for_thinctl() {
    let lab = Lab::new("daemon-ops");
    // The same commands on a pool nobody serves print the same text.
    let direct = Lab::new("daemon-ops-direct");
    for l in [&lab, &direct] {
        l.ctl(&["create", "vol-a", "16M"]);
    }
    let daemon = lab.start(&["daemon"]);
    let ctl = lab.control();
    let sa = lab.path("a.sock");
    lab.ctl(&["serve-add", "vol-a", "--socket", sa.to_str().unwrap()]);
    let mut ca = Client::connect(&sa, 1);
    let data = pattern(5, LEN);
    ca.data(0, LEN).copy_from_slice(&data);
    assert_eq!(ca.write(0, 0, LEN), S_OK);

    // Each step succeeds through the daemon with the direct path's text.
    let both = |args: &[&str]| -> String {
        let served = lab.ctl(args);
        let here = direct.ctl(args);
        assert_eq!(served, here, "thinctl {args:?}");
        served
    };
    let out = both(&["create", "vm-2", "32M"]);
    assert_eq!(out, "created volume 'vm-2' (32M, 33554432 bytes)\n");
    let out = both(&["resize", "vm-2", "64M"]);
    assert_eq!(
        out,
        "resized volume 'vm-2' from 32M to 64M (67108864 bytes)\n"
    );
    both(&["resize", "vm-2", "48M", "--force"]);
    for l in [&lab, &direct] {
        l.ctl(&["snapshot", "vm-2@s1"]);
        l.ctl(&["snapshot", "vm-2@s2"]);
    }
    let out = both(&["rollback", "vm-2@s1", "--force"]);
    assert_eq!(
        out,
        "rolled back 'vm-2' to 'vm-2@s1'\nremoved newer snapshots: vm-2@s2\n"
    );
    let out = both(&["clone", "vm-2@s1", "c1"]);
    assert!(
        out.starts_with("created linked clone 'c1' of 'vm-2@s1' (48M"),
        "{out}"
    );
    let out = both(&["base", "c1", "--name", "b1"]);
    assert_eq!(
        out,
        "'b1' is now a read-only base image (renamed from 'c1')\n"
    );
    both(&["clone", "b1", "c2"]);
    let out = both(&["rename", "c2", "c3"]);
    assert_eq!(out, "renamed volume 'c2' to 'c3'\n");
    let out = both(&[
        "pool",
        "set",
        "--max-overcommit",
        "50",
        "--data-thresholds",
        "70,80",
    ]);
    assert!(
        out.contains("data warnings at 70%, 80%,") && out.contains("50.00x"),
        "{out}"
    );

    // The engine's refusals come back as errors, for both paths alike.
    for args in [
        &["create", "vm-2", "16M"][..],
        &["resize", "vm-2", "16M"],
        &["resize", "vm-2@s1", "64M"],
        &["remove", "vm-2"],
        &["remove", "nope"],
        &["rename", "vm-2", "b1"],
        &["rollback", "vm-2"],
        &["clone", "vm-2", "c9"],
        &["base", "vm-2@s1"],
        &["pool", "set", "--max-overcommit", "0.5"],
    ] {
        let served = lab.ctl_fails(args);
        let here = direct.ctl_fails(args);
        assert_eq!(served, here, "thinctl {args:?}");
        assert!(!served.contains("open for writing"), "{served}");
    }

    // What the pool holds now, seen by a reader beside the daemon.
    let vm2 = listed_one(&lab, "vm-2").expect("vm-2 listed");
    assert_eq!(field(&vm2, "size_bytes"), Some("50331648"));
    let b1 = listed_one(&lab, "b1").expect("b1 listed");
    assert_eq!(field(&b1, "base"), Some("true"));
    assert_eq!(field(&b1, "clone_of"), Some("\"vm-2@s1\""));
    let c3 = listed_one(&lab, "c3").expect("c3 listed");
    assert_eq!(field(&c3, "clone_of"), Some("\"b1\""));
    assert!(listed_one(&lab, "c1").is_none() && listed_one(&lab, "c2").is_none());
    assert!(listed_one(&lab, "vm-2@s2").is_none());
    let status = raw_request(&ctl, b"{\"op\":\"status\"}\n", false);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["ok"]["served"], 1, "{status}");

    // The served volume: no removal, rollback or base while served; a
    // rename keeps it served under its new name.
    lab.ctl(&["snapshot", "vol-a@s"]);
    let e = lab.ctl_fails(&["remove", "vol-a", "--recursive"]);
    assert!(e.contains("volume 'vol-a' is open"), "{e}");
    let e = lab.ctl_fails(&["rollback", "vol-a@s"]);
    assert!(e.contains("is open"), "{e}");
    let e = lab.ctl_fails(&["base", "vol-a"]);
    assert!(e.contains("is open"), "{e}");
    let out = lab.ctl(&["rename", "vol-a", "vol-r"]);
    assert_eq!(out, "renamed volume 'vol-a' to 'vol-r'\n");
    assert_eq!(
        served_list(&ctl),
        vec![("vol-r".to_string(), sa.display().to_string())]
    );
    assert!(listed_one(&lab, "vol-r@s").is_some());
    assert_eq!(ca.read(0, LEN, LEN), S_OK);
    same(ca.data(LEN, LEN), &data, "served volume after its rename");
    let out = lab.ctl(&["resize", "vol-r", "32M"]);
    assert!(out.contains("from 16M to 32M"), "{out}");
    // Past the old end, within the new one.
    assert_eq!(ca.write(48 << 10, 0, LEN), S_OK);
    let e = lab.ctl_fails(&["remove", "vol-r", "-r"]);
    assert!(e.contains("volume 'vol-r' is open"), "{e}");
    assert!(listed_one(&lab, "vol-r").is_some(), "served volume removed");

    // Stopped, it can go.
    drop(ca);
    lab.ctl(&["serve-remove", "vol-r"]);
    let out = lab.ctl(&["rollback", "vol-r@s"]);
    assert_eq!(out, "rolled back 'vol-r' to 'vol-r@s'\n");
    let out = lab.ctl(&["remove", "vol-r", "--recursive"]);
    assert_eq!(out, "removed volume 'vol-r' and its snapshots vol-r@s\n");
    for args in [
        &["remove", "c3"][..],
        &["remove", "b1"],
        &["remove", "vm-2@s1"],
    ] {
        assert_eq!(lab.ctl(args), direct.ctl(args), "thinctl {args:?}");
    }
    let out = both(&["remove", "vm-2"]);
    assert_eq!(out, "removed volume 'vm-2'\n");

    // Malformed pool changes: an error line each, nothing done.
    for bytes in [
        &br#"{"op":"create","name":"vm/x","bytes":4096}"#[..],
        br#"{"op":"create","name":"vm-x","bytes":4096,"please":true}"#,
        br#"{"op":"create","name":"vm-x","bytes":12}"#,
        br#"{"op":"create","name":"vm-x","bytes":"4096"}"#,
        br#"{"op":"delete","name":"../x"}"#,
        br#"{"op":"rename","old":"a"}"#,
        br#"{"op":"rollback","snapshot":"vol-r"}"#,
        br#"{"op":"clone","source":"a@b","new":"c@d"}"#,
        br#"{"op":"base","name":"a","new_name":"b c"}"#,
        br#"{"op":"policy","change":{"when_full":7}}"#,
        br#"{"op":"policy","change":{"data_warn_pct":[1,2]}}"#,
    ] {
        let mut line = bytes.to_vec();
        line.push(b'\n');
        let reply = raw_request(&ctl, &line, false);
        assert!(
            is_error_line(&reply),
            "{:?} -> {reply:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(listed(&lab).is_empty(), "{:?}", listed(&lab));

    // Nothing is served any more: stopped by hand (Lab::stop expects a
    // volume to stop).
    let mut daemon = daemon;
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let st = daemon.wait().unwrap();
    assert!(st.success(), "exited with {st}:\n{}", lab.log());
    assert!(!ctl.exists() && !sa.exists(), "sockets left behind");
    let check = lab.ctl(&["check"]);
    assert!(check.contains("clean"), "pool check: {check}");
    let policy = lab.ctl(&["pool", "status", "--json"]);
    assert!(policy.contains("\"max_overcommit_pct\": 5000"), "{policy}");
}
