"""`ray-broker` CLI end to end: start a local head with the CLI, run commands as subprocesses, stop it.

The head is started by `ray-broker start` with its own temp dir and free ports, and its state file
lives in a per-test RAY_BROKER_HOME, so this runs next to other Ray instances on the machine and
stops only its own processes (also when a test fails).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HELP_COMMANDS = [[], ["start"], ["stop"], ["status"], ["topics"], ["topics", "create"], ["topics", "list"],
                 ["topics", "describe"], ["topics", "delete"], ["produce"], ["consume"], ["transactions"],
                 ["transactions", "list"], ["transactions", "describe"], ["transactions", "abort"]]


def _env(home: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if home:
        env["RAY_BROKER_HOME"] = home
    return env


def run_cli(args, home=None, stdin: str | None = None, timeout: float = 150.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_broker.cli.main", *args], input=stdin, capture_output=True,
                          text=True, env=_env(home), cwd=REPO, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, code: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: [{code}] "), proc.stderr


@pytest.mark.parametrize("cmd", HELP_COMMANDS, ids=lambda c: "-".join(c) or "top")
def test_help(cmd, capsys):
    # in-process (argparse prints and exits): one subprocess per command would cost seconds each
    from ray_broker.cli.main import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*cmd, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "usage:" in out
    if cmd:
        assert "--address" in out  # global options are accepted after the command too


def test_entry_point_help():
    proc = run_cli(["--help"], timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_no_cluster_is_a_clean_error(tmp_path):
    proc = run_cli(["topics", "list"], home=str(tmp_path / "home"))
    assert_clean_error(proc, "BROKER_NOT_FOUND")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("rb_home"))
    data = str(tmp_path_factory.mktemp("rb_data"))
    try:
        proc = run_cli(["start", "--data-dir", data, "--num-cpus", "2"], home=home, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "broker running" in proc.stdout
        yield home
    finally:
        run_cli(["stop"], home=home, timeout=120)
        # belt and braces: whatever `stop` could not do, do it here (only this head's processes)
        sys.path.insert(0, REPO)
        from ray_broker.cli import local_head

        old = os.environ.get("RAY_BROKER_HOME")
        os.environ["RAY_BROKER_HOME"] = home
        try:
            state = local_head.read_state()
            if state:
                local_head.stop_head(state)
                local_head.clear_state()
        finally:
            if old is None:
                os.environ.pop("RAY_BROKER_HOME", None)
            else:
                os.environ["RAY_BROKER_HOME"] = old


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_topics_lifecycle(broker):
    p = run_cli(["topics", "create", "cli-orders", "--partitions", "3", "--replication-factor", "2",
                 "--config", "min.insync.replicas=2", "--config", "retention.ms=3600000"], home=broker)
    assert p.returncode == 0, p.stderr
    p = run_cli(["topics", "list"], home=broker)
    assert p.returncode == 0 and "cli-orders" in p.stdout.split(), p.stderr
    p = run_cli(["topics", "describe", "cli-orders"], home=broker)
    assert p.returncode == 0, p.stderr
    assert "PartitionCount: 3" in p.stdout and "ReplicationFactor: 2" in p.stdout
    assert "min.insync.replicas=2" in p.stdout and "retention.ms=3600000" in p.stdout
    p = run_cli(["topics", "describe", "cli-orders", "--json"], home=broker)
    assert p.returncode == 0, p.stderr
    desc = json.loads(p.stdout)
    assert [q["partition"] for q in desc["partitions"]] == [0, 1, 2]
    assert all(len(q["replicas"]) == 2 for q in desc["partitions"])

    assert_clean_error(run_cli(["topics", "create", "cli-orders"], home=broker), "TOPIC_ALREADY_EXISTS")
    p = run_cli(["topics", "create", "cli-orders", "--if-not-exists"], home=broker)
    assert p.returncode == 0, p.stderr

    p = run_cli(["status"], home=broker)
    assert p.returncode == 0, p.stderr
    assert "controller epoch" in p.stdout and "cli-orders" in p.stdout and "FOLLOWER-LAG" in p.stdout

    p = run_cli(["topics", "delete", "cli-orders"], home=broker)
    assert p.returncode == 0, p.stderr
    p = run_cli(["topics", "list"], home=broker)
    assert "cli-orders" not in p.stdout.split()
    assert_clean_error(run_cli(["topics", "describe", "cli-orders"], home=broker), "UNKNOWN_TOPIC_OR_PARTITION")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_produce_consume_round_trip(broker):
    p = run_cli(["topics", "create", "cli-rt", "--partitions", "2"], home=broker)
    assert p.returncode == 0, p.stderr
    lines = [f"k{i}:value-{i}" for i in range(50)]
    p = run_cli(["produce", "cli-rt", "--key-separator", ":"], home=broker, stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    assert "produced 50 record" in p.stdout
    p = run_cli(["consume", "cli-rt", "--from-beginning", "--max-messages", "50", "--timeout", "30",
                 "--print-key", "--key-separator", ":"], home=broker)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == sorted(lines)
    assert "consumed 50 record" in p.stderr
    # kafka-console-consumer spelling
    p = run_cli(["consume", "cli-rt", "--from-beginning", "--max-messages", "50",
                 "--timeout", "30", "--property", "print.key=true", "--property", "key.separator=:"], home=broker)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == sorted(lines)

    # JSON in and out, explicit partition, headers
    records = [{"key": "a", "value": "x", "headers": {"h": "1"}, "partition": 1}, {"value": "no-key"}]
    p = run_cli(["produce", "cli-rt", "--json"], home=broker, stdin="\n".join(json.dumps(r) for r in records))
    assert p.returncode == 0, p.stderr
    p = run_cli(["consume", "cli-rt", "--partition", "1", "--from-beginning", "--json", "--timeout", "5",
                 "--isolation-level", "read_uncommitted"], home=broker)
    assert p.returncode == 0, p.stderr
    out = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert all(r["partition"] == 1 for r in out)
    assert any(r["key"] == "a" and r["value"] == "x" and r["headers"] == [["h", "1"]] for r in out), out

    # bad input: one clear line, exit 2
    assert_clean_error(run_cli(["produce", "cli-rt", "--key-separator", ":"], home=broker, stdin="no separator\n"),
                       "INVALID_RECORD")
    assert_clean_error(run_cli(["produce", "cli-rt", "--json"], home=broker, stdin="[1, 2]\n"), "INVALID_RECORD")
    assert_clean_error(run_cli(["consume", "no-such-topic", "--timeout", "1"], home=broker),
                       "UNKNOWN_TOPIC_OR_PARTITION")
    assert_clean_error(run_cli(["topics", "create", "cli-bad", "--config", "no.such.key=1"], home=broker),
                       "INVALID_CONFIG")
    assert_clean_error(run_cli(["topics", "create", "bad name!"], home=broker), "INVALID_TOPIC_EXCEPTION")
