"""`ray-broker` CLI end to end.

One test starts a local head with `ray-broker start` (own temp dir, free ports, state file in a
per-test RAY_BROKER_HOME, so it runs next to other Ray instances and stops only its own processes)
and drives it with real subprocesses: stdin, stdout, exit codes. The other commands run in-process
through `main()` against the session's broker (a subprocess per command costs seconds each).
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
                 ["transactions", "list"], ["transactions", "describe"], ["transactions", "abort"], ["metrics"]]


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
def cli_head(tmp_path_factory):
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


class InProcessCli:
    """`ray-broker ARGS` through `main()` in this process, returning what a subprocess run would."""

    def __init__(self, capsys, monkeypatch):
        self.capsys, self.monkeypatch = capsys, monkeypatch

    def __call__(self, args, stdin: str | None = None) -> subprocess.CompletedProcess:
        import io

        from ray_broker.cli.main import main

        self.capsys.readouterr()
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
        out = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)


@pytest.fixture
def cli(broker, capsys, monkeypatch):
    return InProcessCli(capsys, monkeypatch)


def test_topics_lifecycle(cli, topic_name):
    name = topic_name
    p = cli(["topics", "create", name, "--partitions", "3", "--replication-factor", "2",
             "--config", "min.insync.replicas=2", "--config", "retention.ms=3600000"])
    assert p.returncode == 0, p.stderr
    p = cli(["topics", "list"])
    assert p.returncode == 0 and name in p.stdout.split(), p.stderr
    p = cli(["topics", "describe", name])
    assert p.returncode == 0, p.stderr
    assert "PartitionCount: 3" in p.stdout and "ReplicationFactor: 2" in p.stdout
    assert "min.insync.replicas=2" in p.stdout and "retention.ms=3600000" in p.stdout
    p = cli(["topics", "describe", name, "--json"])
    assert p.returncode == 0, p.stderr
    desc = json.loads(p.stdout)
    assert [q["partition"] for q in desc["partitions"]] == [0, 1, 2]
    assert all(len(q["replicas"]) == 2 for q in desc["partitions"])

    assert_clean_error(cli(["topics", "create", name]), "TOPIC_ALREADY_EXISTS")
    p = cli(["topics", "create", name, "--if-not-exists"])
    assert p.returncode == 0, p.stderr

    p = cli(["status"])
    assert p.returncode == 0, p.stderr
    assert "controller epoch" in p.stdout and name in p.stdout and "FOLLOWER-LAG" in p.stdout

    p = cli(["topics", "delete", name])
    assert p.returncode == 0, p.stderr
    p = cli(["topics", "list"])
    assert name not in p.stdout.split()
    assert_clean_error(cli(["topics", "describe", name]), "UNKNOWN_TOPIC_OR_PARTITION")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_started_head_serves_produce_and_consume_subprocesses(cli_head):
    p = run_cli(["topics", "create", "cli-rt", "--partitions", "2"], home=cli_head)
    assert p.returncode == 0, p.stderr
    lines = [f"k{i}:value-{i}" for i in range(50)]
    p = run_cli(["produce", "cli-rt", "--key-separator", ":"], home=cli_head, stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    assert "produced 50 record" in p.stdout
    p = run_cli(["consume", "cli-rt", "--from-beginning", "--max-messages", "50", "--timeout", "30",
                 "--print-key", "--key-separator", ":"], home=cli_head)
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == sorted(lines)
    assert "consumed 50 record" in p.stderr


def test_produce_consume_formats_and_bad_input(cli, topic_name):
    t = topic_name
    assert cli(["topics", "create", t, "--partitions", "2", "--replication-factor", "1"]).returncode == 0
    lines = [f"k{i}:value-{i}" for i in range(50)]
    p = cli(["produce", t, "--key-separator", ":"], stdin="\n".join(lines) + "\n")
    assert p.returncode == 0, p.stderr
    # kafka-console-consumer spelling
    p = cli(["consume", t, "--from-beginning", "--max-messages", "50",
             "--timeout", "30", "--property", "print.key=true", "--property", "key.separator=:"])
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()) == sorted(lines)

    # JSON in and out, explicit partition, headers
    records = [{"key": "a", "value": "x", "headers": {"h": "1"}, "partition": 1}, {"value": "no-key"}]
    p = cli(["produce", t, "--json"], stdin="\n".join(json.dumps(r) for r in records))
    assert p.returncode == 0, p.stderr
    p = cli(["consume", t, "--partition", "1", "--from-beginning", "--json", "--timeout", "5",
             "--isolation-level", "read_uncommitted"])
    assert p.returncode == 0, p.stderr
    out = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert out and all(r["partition"] == 1 for r in out)
    assert any(r["key"] == "a" and r["value"] == "x" and r["headers"] == [["h", "1"]] for r in out), out

    # bad input: one clear line, exit 2
    assert_clean_error(cli(["produce", t, "--key-separator", ":"], stdin="no separator\n"), "INVALID_RECORD")
    assert_clean_error(cli(["produce", t, "--json"], stdin="[1, 2]\n"), "INVALID_RECORD")
    assert_clean_error(cli(["consume", "no-such-topic", "--timeout", "1"]), "UNKNOWN_TOPIC_OR_PARTITION")
    assert_clean_error(cli(["topics", "create", f"{t}-bad", "--config", "no.such.key=1"]), "INVALID_CONFIG")
    assert_clean_error(cli(["topics", "create", "bad name!"]), "INVALID_TOPIC_EXCEPTION")
