"""Live-migration downtime: one guest (tests/guest/migrate.sh) migrated
between two QEMUs at 100 MiB/s, its disk served by thinlun (two hosts of
a shared pool, the target --incoming) or by qemu-storage-daemon (two
vhost-user-blk exports of one raw file). Prints QMP query-migrate.
    BACKEND=thinlun|qsd python3 benches/migrate.py
Needs the lab (../shared/lab) and a release thinctl (cargo build --release
-p thinctl)."""
import json, os, socket, subprocess, sys, time, threading
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = os.path.join(REPO, "target/release/thinctl")
D = os.path.join(os.environ.get("THINLUN_BENCH_DIR", "/var/tmp/thinlun-bench"), "migrate")
os.makedirs(D, exist_ok=True)
os.chdir(D)
LAB = os.path.join(REPO, "../shared/lab")
os.environ["THINLUN_POOL"] = "" + D + "/pool.img"
for f in ["" + D + "/a.sock", "" + D + "/b.sock", "src.qmp", "dst.qmp", "mig.sock"]:
    try: os.unlink(f)
    except FileNotFoundError: pass
la = open("a.log", "w"); lb = open("b.log", "w")
if os.environ.get("BACKEND") == "qsd":
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "" + D + "/q.raw", "1G"], check=True)
    def qsd(sock, log):
        return subprocess.Popen(["qemu-storage-daemon", "--blockdev", "driver=file,node-name=f0,filename=" + D + "/q.raw,cache.direct=on,aio=io_uring,locking=off",
            "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},writable=on"], stderr=log)
    A = qsd("" + D + "/a.sock", la); B = qsd("" + D + "/b.sock", lb)
else:
    if not os.path.exists(D + "/pool.img"):
        subprocess.run([T, "pool", "create", "--size", "2G", "--shared", "--host-id", "1", "--io-timeout", "1s"], check=True)
        subprocess.run([T, "--host-id", "1", "create", "vm", "1G"], check=True)
    A = subprocess.Popen([T, "--host-id", "1", "serve", "vm", "--socket", "" + D + "/a.sock", "--control", "a.ctl"], stderr=la)
    B = subprocess.Popen([T, "--host-id", "2", "serve", "vm", "--socket", "" + D + "/b.sock", "--control", "b.ctl", "--incoming"], stderr=lb)
while not (os.path.exists("" + D + "/a.sock") and os.path.exists("" + D + "/b.sock")): time.sleep(0.05)
env = dict(os.environ, GUEST_TIMEOUT="200", LOOP_SECS=os.environ.get("LOOP_SECS", "25"))
def guest(sock, tag, extra):
    p = subprocess.Popen(["bash", f"{LAB}/run-guest.sh", sock, os.path.join(REPO, "tests/guest/migrate.sh")], env=dict(env, **extra),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    ready = threading.Event()
    def rd():
        for l in p.stdout:
            l = l.rstrip()
            lines.append(l); print(f"[{tag}] {l}", flush=True)
            if "MIGRATE-READY" in l: ready.set()
    threading.Thread(target=rd, daemon=True).start()
    return p, lines, ready
src, sl, ready = guest("" + D + "/a.sock", "src", {"QMP": "src.qmp"})
def qmp(path):
    s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile("rw")
    f.readline(); f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n"); f.flush(); f.readline()
    def cmd(c, **a):
        f.write(json.dumps({"execute": c, "arguments": a}) + "\n"); f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r: return r
    return cmd
if not ready.wait(150): print("never ready"); sys.exit(1)
dst, dl, _ = guest("" + D + "/b.sock", "dst", {"QMP": "dst.qmp", "INCOMING": "unix:" + D + "/mig.sock"})
while not os.path.exists("dst.qmp"): time.sleep(0.05)
while not os.path.exists("" + D + "/mig.sock"): time.sleep(0.05)
q = qmp("src.qmp")
q("migrate-set-parameters", **{"max-bandwidth": 100 << 20})
t0 = time.time()
print("migrate:", q("migrate", uri="unix:" + D + "/mig.sock"), flush=True)
while True:
    r = q("query-migrate")["return"]
    if r.get("status") in ("completed", "failed", "cancelled"): break
    time.sleep(0.1)
print("MIGRATION", json.dumps(r), f"{time.time()-t0:.1f}s", flush=True)
q("quit")
dst.wait(timeout=200)
time.sleep(0.5)
for p in (A, B): p.terminate(); p.wait()
print("---- a.log"); print(open("a.log").read())
print("---- b.log"); print(open("b.log").read())
