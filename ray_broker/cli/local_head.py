"""A local Ray head started by `ray-broker start` (so it outlives the CLI process), and its state file.

`ray-broker start` without --address / RAY_ADDRESS runs `ray start --head` with:
- its own temp dir (`/tmp/rb_XXXX`), so it does not become "the latest cluster" in /tmp/ray that a
  plain `ray.init()` elsewhere on the machine would silently attach to;
- free ports for GCS, dashboard, client server and agents, so it can run next to other Ray instances.

The head's address and temp dir go to `$RAY_BROKER_HOME/local_head.json` (default ~/.ray_broker);
later commands without --address use that address. `ray-broker stop` stops exactly the processes of
that head (those whose command line names its temp dir or GCS address, and their children): unlike
`ray stop`, it leaves other Ray instances on the machine alone.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ..protocol import RAY_SYSTEM_CONFIG

STATE_FILE = "local_head.json"


def home() -> str:
    return os.environ.get("RAY_BROKER_HOME") or os.path.join(os.path.expanduser("~"), ".ray_broker")


def state_path() -> str:
    return os.path.join(home(), STATE_FILE)


def read_state() -> dict | None:
    try:
        with open(state_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_state(state: dict) -> None:
    os.makedirs(home(), exist_ok=True)
    tmp = state_path() + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, state_path())


def clear_state() -> None:
    try:
        os.remove(state_path())
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def is_listening(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def head_alive(state: dict | None) -> bool:
    return bool(state) and is_listening(state["address"])


def start_head(num_cpus: int | None = None, timeout_s: float = 120.0) -> dict:
    """Run `ray start --head` in the background; returns the state written to the state file."""
    # the `ray` next to this interpreter first (a venv's), so head and driver run the same Ray
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_bin):
        ray_bin = shutil.which("ray") or "ray"
    temp_dir = tempfile.mkdtemp(prefix="rb_", dir="/tmp")  # short: Ray's socket paths are length-limited
    port = _free_port()
    cmd = [ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
           "--include-dashboard=false", "--disable-usage-stats",
           f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
           f"--system-config={json.dumps(RAY_SYSTEM_CONFIG)}"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          timeout=timeout_s, start_new_session=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise RuntimeError(f"`ray start --head` failed (exit {proc.returncode}): {tail}")
    address_file = os.path.join(temp_dir, "ray_current_cluster")
    address = None
    if os.path.exists(address_file):
        with open(address_file) as f:
            address = f.read().strip() or None
    if address is None:
        address = f"{_node_ip()}:{port}"
    state = {"address": address, "temp_dir": temp_dir, "port": port, "started_at": time.time()}
    write_state(state)
    return state


def _node_ip() -> str:
    try:
        from ray._private.services import get_node_ip_address

        return get_node_ip_address()
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(name))
    return out


def head_pids(state: dict) -> list[int]:
    """Processes of this head: command line names its temp dir or GCS address; plus descendants."""
    marks = [state["temp_dir"], f"--address={state['address']}", f"--gcs-address={state['address']}"]
    mine = _ancestors()
    roots = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine:
            cmd = _cmdline(int(name))
            if any(m in cmd for m in marks):
                roots.append(int(name))
    children = _children()
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen or pid in mine:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, []))
    return sorted(seen)


def _ancestors() -> set[int]:
    """This process and its parents (never signal the shell or test runner that called us)."""
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_head(state: dict, grace_s: float = 5.0) -> int:
    """SIGTERM the head's processes, SIGKILL what is left after `grace_s`; returns how many there were."""
    if sys.platform != "linux":  # no /proc: fall back to Ray's own (machine-wide) stop
        subprocess.run(["ray", "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return -1
    pids = head_pids(state)
    count = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)] + [p for p in head_pids(state) if p not in pids]
        if not pids:
            break
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    return count
