"""`ray-broker`: run and inspect a ray_broker deployment from the shell.

    ray-broker start                                   # local Ray head + broker (or --address to deploy on a cluster)
    ray-broker topics create orders --partitions 3 --replication-factor 3 --config min.insync.replicas=2
    printf 'k1:hello\\nk2:world\\n' | ray-broker produce orders --key-separator :
    ray-broker consume orders --from-beginning --max-messages 2 --print-key
    ray-broker status
    ray-broker stop

Errors print one line, `error: [CODE] message`, to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from . import local_head

EXIT_ERROR = 2


class CliError(Exception):
    """A user-facing failure: printed as `error: [CODE] message`, exit status 2."""

    def __init__(self, message: str, code: str = "INVALID_REQUEST"):
        super().__init__(message)
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------------------ helpers
def _kv_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise CliError(f"{what} {part!r} is not of the form key=value", "INVALID_CONFIG")
            out[key.strip()] = value.strip()
    return out


def _explicit_address(args) -> str | None:
    return args.address or os.environ.get("RAY_ADDRESS") or None


def _resolve_address(args) -> tuple[str | None, dict | None]:
    """(address, local-head state if the address is the head `start` made)."""
    address = _explicit_address(args)
    state = local_head.read_state()
    if address:
        return address, state if state and state.get("address") == address else None
    if state and local_head.head_alive(state):
        return state["address"], state
    return None, None


def _enable_token_auth() -> None:
    """A head made by `ray start` uses token authentication (token in ~/.ray/auth_token). Ray only
    turns it on by itself for address "auto", and reads RAY_AUTH_MODE into its config at import."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise CliError(f"the local head uses token authentication but RAY_AUTH_MODE={mode}; unset it",
                       "INVALID_CONFIG")
    if mode is None:
        try:
            from ray._private.authentication.authentication_token_setup import _enable_token_auth as enable

            enable()  # sets RAY_AUTH_MODE=token and refreshes Ray's cached config
        except ImportError:
            os.environ["RAY_AUTH_MODE"] = "token"


def _ray_init(address: str, namespace: str, local: bool) -> None:
    import ray

    if local:
        _enable_token_auth()

    if ":" in address and "://" not in address and not local_head.is_listening(address, timeout=3.0):
        raise CliError(f"no Ray cluster answers at {address}", "BROKER_NOT_FOUND")
    try:
        ray.init(address=address, namespace=namespace, logging_level="WARNING", log_to_driver=False,
                 configure_logging=False)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, RuntimeError ...
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "auth" in str(exc).lower():
            hint = " (token authentication: set RAY_AUTH_MODE=token and make the cluster's token available)"
        raise CliError(f"cannot connect to Ray at {address}: {msg}{hint}", "BROKER_NOT_FOUND") from None


def _connect(args):
    """A `Cluster` attached to the broker in --namespace (over this process's Ray connection when
    `main()` is called from a driver that is already connected, e.g. a notebook or a test)."""
    import ray

    import ray_broker as rb

    if ray.is_initialized():
        return rb.connect(namespace=args.namespace)
    address, state = _resolve_address(args)
    if address is None:
        raise CliError("no Ray cluster to talk to: give --address, set RAY_ADDRESS, or run `ray-broker start`",
                       "BROKER_NOT_FOUND")
    _ray_init(address, args.namespace, local=state is not None)
    return rb.connect(namespace=args.namespace)


def _topic_partitions(admin, topic: str, partition: int | None):
    import ray_broker as rb

    desc = admin.describe_topic(topic)
    n = len(desc.partitions)
    if partition is not None:
        if not 0 <= partition < n:
            raise CliError(f"topic {topic!r} has no partition {partition} (it has {n})",
                           "UNKNOWN_TOPIC_OR_PARTITION")
        return desc, [rb.TopicPartition(topic, partition)]
    return desc, [rb.TopicPartition(topic, p.partition) for p in desc.partitions]


def _config_str(config: dict) -> str:
    return ",".join(f"{k.replace('_', '.')}={v}" for k, v in sorted(config.items()))


def _fmt_list(xs) -> str:
    return ",".join(str(x) for x in xs) if xs else "-"


def _fmt_bytes(n: int | None) -> str:
    if n is None or n < 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _print_table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ------------------------------------------------------------------------------------------ commands
def cmd_start(args) -> int:
    import ray

    import ray_broker as rb

    address = _explicit_address(args)
    started = False
    state = None
    if address is None:
        state = local_head.read_state()
        if not local_head.head_alive(state):
            if state:
                local_head.clear_state()
            print("starting a local Ray head (`ray start --head`) ...", file=sys.stderr)
            state = local_head.start_head(num_cpus=args.num_cpus)
            started = True
        address = state["address"]
    data_dir = os.path.abspath(args.data_dir or rb.cluster.DEFAULT_DATA_DIR)
    try:
        _ray_init(address, args.namespace, local=state is not None)
        controller = rb.deploy(args.namespace, data_dir, args.config)
        info = ray.get(controller.ping.remote(), timeout=30)
    except BaseException:
        if started:
            local_head.stop_head(state)
            local_head.clear_state()
        raise
    if state is not None:
        state.update({"namespace": args.namespace, "data_dir": data_dir})
        local_head.write_state(state)
    where = f"local Ray head at {address}" + (" (started)" if started else " (already running)") \
        if state is not None else f"Ray cluster at {address}"
    print(f"broker running in namespace {args.namespace!r} on {where}; data dir {data_dir}; "
          f"controller epoch {info['controller_epoch']}, {info['topics']} topic(s)")
    if state is not None:
        print(f"stop it with: ray-broker stop   (other shells: export RAY_ADDRESS={address} RAY_AUTH_MODE=token)")
    return 0


def cmd_stop(args) -> int:
    import ray

    from ..cluster import find_controller
    from ..errors import BrokerNotFoundError

    address, state = _resolve_address(args)
    if address is None:
        stale = local_head.read_state()
        if stale:
            local_head.stop_head(stale)
            local_head.clear_state()
            print("local Ray head was not answering; cleaned up its processes")
            return 0
        raise CliError("no broker to stop: no --address, RAY_ADDRESS or local head started by `ray-broker start`",
                       "BROKER_NOT_FOUND")
    _ray_init(address, args.namespace, local=state is not None)
    stopped = False
    try:
        controller = find_controller(args.namespace)
    except BrokerNotFoundError:
        if state is None or args.keep_ray:
            raise
        controller = None
    if controller is not None:
        try:
            ray.get(controller.shutdown_broker.remote(), timeout=30)
        finally:
            ray.kill(controller, no_restart=True)
        stopped = True
        print(f"broker in namespace {args.namespace!r} stopped (data stays on disk)")
    ray.shutdown()
    if state is not None and not args.keep_ray:
        n = local_head.stop_head(state)
        local_head.clear_state()
        print(f"local Ray head at {state['address']} stopped ({n} processes)")
    elif not stopped:
        print("nothing to stop")
    return 0


def _follower_lags(desc, reports: dict) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    for p in desc.partitions:
        lags = {}
        for r in p.replicas:
            if r == p.leader:
                continue
            rep = reports.get(f"{desc.name}/{p.partition}/{r}")
            if rep is None or p.high_watermark < 0:
                continue
            lags[r] = max(0, p.high_watermark - rep.get("log_end_offset", 0))
        out[p.partition] = lags
    return out


def cmd_status(args) -> int:
    import ray

    cluster = _connect(args)
    try:
        st = ray.get(cluster.controller.status.remote(), timeout=60)
        reports = ray.get(cluster.controller.replica_reports.remote(), timeout=60)
        admin = cluster.admin()
        topics = admin.list_topics(include_internal=True)
        descs = [admin.describe_topic(t) for t in topics]
        if args.json:
            out = {"namespace": args.namespace, "controller_epoch": st["controller_epoch"], "nodes": st["nodes"],
                   "topics": []}
            for d in descs:
                lags = _follower_lags(d, reports)
                parts = []
                for p in d.partitions:
                    leader_rep = reports.get(f"{d.name}/{p.partition}/{p.leader}", {})
                    parts.append({**p.__dict__, "size_bytes": leader_rep.get("size_bytes"),
                                  "follower_lag": {str(k): v for k, v in lags[p.partition].items()}})
                out["topics"].append({"name": d.name, "internal": d.internal, "partitions": parts})
            print(json.dumps(out, indent=2, default=str))
            return 0
        print(f"namespace:        {args.namespace}")
        print(f"controller epoch: {st['controller_epoch']}")
        print(f"nodes:            {len(st['nodes'])} alive ({', '.join(n[:12] for n in st['nodes'])})")
        print(f"topics:           {len(descs)}")
        rows = []
        under = 0
        for d in descs:
            lags = _follower_lags(d, reports)
            for p in d.partitions:
                leader_rep = reports.get(f"{d.name}/{p.partition}/{p.leader}", {})
                lag = ",".join(f"{r}:{v}" for r, v in sorted(lags[p.partition].items())) or "-"
                under += len(p.isr) < len(p.replicas)
                rows.append([d.name, p.partition, p.leader if p.leader is not None else "none",
                             _fmt_list(p.replicas), _fmt_list(p.isr), p.leader_epoch, p.log_start_offset,
                             p.high_watermark, _fmt_bytes(leader_rep.get("size_bytes")), lag])
        if rows:
            print()
            _print_table(rows, ["TOPIC", "PARTITION", "LEADER", "REPLICAS", "ISR", "LEADER-EPOCH", "LOG-START",
                                "HIGH-WATERMARK", "SIZE", "FOLLOWER-LAG"])
        print(f"\nunder-replicated partitions: {under}")
        return 0
    finally:
        cluster.shutdown()


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: an integer 0-65535 (0: any free one)")
    return port


def cmd_metrics(args) -> int:
    from ..metrics.collect import BrokerCollector, snapshot
    from ..metrics.exposition import render

    cluster = _connect(args)
    try:
        if args.serve is None:
            print(render(snapshot(cluster, include_groups=not args.no_groups)), end="")
            return 0
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(BrokerCollector(cluster, include_groups=not args.no_groups))
        server, thread = start_http_server(args.serve, addr=args.bind, registry=registry)
        print(f"serving broker metrics on http://{args.bind}:{server.server_port}/metrics (Ctrl-C stops)",
              flush=True)
        try:
            thread.join()
        except KeyboardInterrupt:
            server.shutdown()
        return 0
    finally:
        cluster.shutdown()


def cmd_topics_create(args) -> int:
    from ..errors import TopicAlreadyExistsError

    config = _kv_pairs(args.config_kv, "--config")
    cluster = _connect(args)
    try:
        admin = cluster.admin()
        try:
            desc = admin.create_topic(args.name, partitions=args.partitions,
                                      replication_factor=args.replication_factor, config=config)
        except TopicAlreadyExistsError:
            if not args.if_not_exists:
                raise
            print(f"topic {args.name!r} already exists")
            return 0
        print(f"created topic {desc.name!r} with {len(desc.partitions)} partition(s), "
              f"replication factor {len(desc.partitions[0].replicas) if desc.partitions else 0}")
        return 0
    finally:
        cluster.shutdown()


def cmd_topics_list(args) -> int:
    cluster = _connect(args)
    try:
        for name in cluster.admin().list_topics(include_internal=args.include_internal):
            print(name)
        return 0
    finally:
        cluster.shutdown()


def cmd_topics_describe(args) -> int:
    cluster = _connect(args)
    try:
        d = cluster.admin().describe_topic(args.name)
        if args.json:
            print(json.dumps({"name": d.name, "topic_id": d.topic_id, "internal": d.internal, "config": d.config,
                              "schema": None if d.schema is None else str(d.schema),
                              "partitions": [p.__dict__ for p in d.partitions]}, indent=2, default=str))
            return 0
        rf = len(d.partitions[0].replicas) if d.partitions else 0
        print(f"Topic: {d.name}\tTopicId: {d.topic_id}\tPartitionCount: {len(d.partitions)}\t"
              f"ReplicationFactor: {rf}\tInternal: {str(d.internal).lower()}")
        print(f"\tConfigs: {_config_str(d.config)}")
        if d.schema is not None:
            print(f"\tSchema: {', '.join(f'{f.name}: {f.type}' for f in d.schema)}")
        for p in d.partitions:
            print(f"\tPartition: {p.partition}\tLeader: {p.leader if p.leader is not None else 'none'}\t"
                  f"Replicas: {_fmt_list(p.replicas)}\tIsr: {_fmt_list(p.isr)}\tLeaderEpoch: {p.leader_epoch}\t"
                  f"LogStartOffset: {p.log_start_offset}\tHighWatermark: {p.high_watermark}\t"
                  f"LastStableOffset: {p.last_stable_offset}")
        return 0
    finally:
        cluster.shutdown()


def cmd_topics_delete(args) -> int:
    cluster = _connect(args)
    try:
        cluster.admin().delete_topic(args.name)
        print(f"deleted topic {args.name!r}")
        return 0
    finally:
        cluster.shutdown()


def _txn_row(d) -> list:
    return [d.transactional_id, d.state, d.producer_id, d.producer_epoch, d.txn_timeout_ms,
            _fmt_list(f"{t}-{p}" for t, p in d.partitions) or "-"]


def cmd_transactions_list(args) -> int:
    cluster = _connect(args)
    try:
        txns = cluster.admin().list_transactions()
        if args.json:
            print(json.dumps([d.__dict__ for d in txns], default=str, indent=2))
        else:
            _print_table([_txn_row(d) for d in txns], ["TRANSACTIONAL-ID", "STATE", "PRODUCER-ID", "EPOCH", "TIMEOUT-MS", "PARTITIONS"])
        return 0
    finally:
        cluster.shutdown()


def cmd_transactions_describe(args) -> int:
    cluster = _connect(args)
    try:
        d = cluster.admin().describe_transaction(args.transactional_id)
        print(json.dumps(d.__dict__, default=str, indent=2))
        return 0
    finally:
        cluster.shutdown()


def cmd_transactions_abort(args) -> int:
    cluster = _connect(args)
    try:
        cluster.admin().abort_transaction(args.transactional_id)
        print(f"aborted transaction {args.transactional_id!r} (its producer is fenced)")
        return 0
    finally:
        cluster.shutdown()


def _state_name(state) -> str:
    return getattr(state, "name", str(state))


def _describe_group_or_fail(admin, group_id: str):
    d = admin.describe_group(group_id)
    if _state_name(d.state) == "DEAD":
        raise CliError(f"consumer group {group_id!r} does not exist", "GROUP_ID_NOT_FOUND")
    return d


def _group_json(d) -> dict:
    return {"group_id": d.group_id, "state": _state_name(d.state), "generation_id": d.generation_id,
            "protocol": d.protocol, "leader_id": d.leader_id,
            "members": [{"member_id": m.member_id, "client_id": m.client_id, "subscription": list(m.subscription),
                         "assignment": [[tp[0], tp[1]] for tp in m.assignment],
                         "session_timeout_ms": m.session_timeout_ms} for m in d.members],
            "partitions": [dict(p.__dict__) for p in d.partitions]}


def cmd_groups_list(args) -> int:
    cluster = _connect(args)
    try:
        groups = cluster.admin().list_groups()
        if args.json:
            print(json.dumps([{"group_id": g.group_id, "state": _state_name(g.state), "protocol": g.protocol}
                              for g in groups], indent=2))
        else:
            _print_table([[g.group_id, _state_name(g.state), g.protocol or "-"] for g in groups],
                         ["GROUP", "STATE", "PROTOCOL"])
        return 0
    finally:
        cluster.shutdown()


def cmd_groups_describe(args) -> int:
    cluster = _connect(args)
    try:
        d = _describe_group_or_fail(cluster.admin(), args.group_id)
        if args.json:
            print(json.dumps(_group_json(d), indent=2, default=str))
            return 0
        print(f"Group: {d.group_id}\tState: {_state_name(d.state)}\tProtocol: {d.protocol or '-'}\t"
              f"Generation: {d.generation_id}\tMembers: {len(d.members)}")
        rows = [[p.topic, p.partition, "-" if p.committed is None else p.committed,
                 "-" if p.last_stable_offset is None else p.last_stable_offset, "-" if p.lag is None else p.lag,
                 "yes" if p.pending else "-", p.member_id or "-", p.client_id or "-"] for p in d.partitions]
        if rows:
            print()
            _print_table(rows, ["TOPIC", "PARTITION", "CURRENT-OFFSET", "LAST-STABLE-OFFSET", "LAG",
                                "TXN-PENDING", "MEMBER-ID", "CLIENT-ID"])
        if d.members:
            print()
            _print_table([[m.member_id, m.client_id or "-", ",".join(m.subscription) or "-",
                           _fmt_list(f"{tp[0]}-{tp[1]}" for tp in m.assignment)] for m in d.members],
                         ["MEMBER-ID", "CLIENT-ID", "SUBSCRIPTION", "ASSIGNMENT"])
        return 0
    finally:
        cluster.shutdown()


def reset_targets(desc, how: str, offset: int | None) -> dict[int, tuple[int, int]]:
    """{partition: (new offset, clamped from)} for `topics describe` output `desc`: earliest = log
    start, latest = last stable offset, offset = N clamped into [log start, last stable offset]."""
    out = {}
    for p in desc.partitions:
        lo, hi = p.log_start_offset, p.last_stable_offset
        if lo is None or hi is None or lo < 0 or hi < 0:
            raise CliError(f"partition {desc.name}-{p.partition} has no leader right now; try again",
                           "LEADER_NOT_AVAILABLE")
        want = lo if how == "earliest" else hi if how == "latest" else int(offset)
        out[p.partition] = (min(max(want, lo), hi), want)
    return out


def cmd_groups_reset_offsets(args) -> int:
    how = "earliest" if args.to_earliest else "latest" if args.to_latest else "offset"
    if how == "offset" and args.to_offset < 0:
        raise CliError("--to-offset must be >= 0", "INVALID_REQUEST")
    cluster = _connect(args)
    try:
        admin = cluster.admin()
        desc, tps = _topic_partitions(admin, args.topic, args.partition)
        plan = reset_targets(desc, how, args.to_offset)
        offsets = {tp: plan[tp.partition][0] for tp in tps}
        current = admin.describe_group(args.group_id)
        before = {(p.topic, p.partition): p.committed for p in current.partitions}
        if not args.dry_run:
            admin.reset_offsets(args.group_id, offsets)   # NON_EMPTY_GROUP while members are live
        elif current.members:
            print(f"note: group {args.group_id!r} has {len(current.members)} live member(s): a real reset "
                  f"would be refused", file=sys.stderr)
        rows = []
        for tp in tps:
            new, wanted = plan[tp.partition]
            old = before.get((tp.topic, tp.partition))
            rows.append([tp.topic, tp.partition, "-" if old is None else old, new,
                         f"clamped from {wanted}" if new != wanted else ""])
        _print_table(rows, ["TOPIC", "PARTITION", "OLD-OFFSET", "NEW-OFFSET", "NOTE"])
        verb = "would reset (dry run)" if args.dry_run else "reset"
        print(f"{verb} offsets of group {args.group_id!r} for {len(tps)} partition(s) of {args.topic!r}")
        return 0
    finally:
        cluster.shutdown()


def _to_bytes(v: Any, what: str, lineno: int) -> bytes | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, (dict, list, int, float, bool)):
        return json.dumps(v, separators=(",", ":")).encode()
    raise CliError(f"line {lineno}: {what} must be a string or JSON value", "INVALID_RECORD")


def _parse_json_line(line: str, lineno: int) -> tuple:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise CliError(f"line {lineno}: not valid JSON ({exc})", "INVALID_RECORD") from None
    if not isinstance(obj, dict):
        raise CliError(f"line {lineno}: expected a JSON object with key/value/headers", "INVALID_RECORD")
    unknown = set(obj) - {"key", "value", "headers", "partition", "timestamp"}
    if unknown:
        raise CliError(f"line {lineno}: unknown field(s) {sorted(unknown)}; use key, value, headers, partition, "
                       f"timestamp", "INVALID_RECORD")
    headers = obj.get("headers")
    if headers is not None:
        if isinstance(headers, dict):
            headers = list(headers.items())
        if not isinstance(headers, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in headers):
            raise CliError(f"line {lineno}: headers must be an object or a list of [key, value] pairs",
                           "INVALID_RECORD")
        headers = [(str(k), _to_bytes(v, "header value", lineno)) for k, v in headers]
    partition = obj.get("partition")
    if partition is not None and (isinstance(partition, bool) or not isinstance(partition, int)):
        raise CliError(f"line {lineno}: partition must be an integer", "INVALID_RECORD")
    ts = obj.get("timestamp")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int)):
        raise CliError(f"line {lineno}: timestamp must be integer milliseconds", "INVALID_RECORD")
    return (_to_bytes(obj.get("key"), "key", lineno), _to_bytes(obj.get("value"), "value", lineno), headers,
            partition, ts)


def _console_properties(args, allowed: set[str]) -> None:
    """Kafka console-tool `--property` keys mapped onto our flags."""
    props = _kv_pairs(args.property, "--property")
    unknown = set(props) - allowed
    if unknown:
        raise CliError(f"unknown --property key(s) {sorted(unknown)}; supported: {sorted(allowed)}",
                       "INVALID_CONFIG")
    sep = props.get("key.separator", "\t")
    if props.get("print.key", "false").lower() == "true":
        args.print_key = True
    if "key.separator" in props and args.key_separator is None and "print.key" in allowed:
        args.key_separator = sep
    if props.get("parse.key", "false").lower() == "true" and args.key_separator is None:
        args.key_separator = sep


def cmd_produce(args) -> int:
    _console_properties(args, {"parse.key", "key.separator"})
    props = _kv_pairs(args.producer_property, "--producer-property")
    props.setdefault("acks", "all")
    if args.key_separator == "":
        raise CliError("--key-separator must not be empty", "INVALID_REQUEST")
    cluster = _connect(args)
    errors: list[BaseException] = []
    count = 0
    try:
        producer = cluster.producer(props)
        # Validate topic (and partition) before reading stdin.
        _topic_partitions(cluster.admin(), args.topic, args.partition)

        def on_done(fut) -> None:
            exc = fut.exception(0)
            if exc is not None:
                errors.append(exc)

        stream = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
        for lineno, raw in enumerate(stream, 1):
            line = raw.decode("utf-8", errors="surrogateescape") if isinstance(raw, bytes) else raw
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if errors:
                break
            partition, ts, headers = args.partition, None, None
            if args.json:
                key, value, headers, p, ts = _parse_json_line(line, lineno)
                partition = p if p is not None else partition
            elif args.key_separator is not None:
                key_s, sep, value_s = line.partition(args.key_separator)
                if not sep:
                    raise CliError(f"line {lineno}: no key separator {args.key_separator!r} in {line[:60]!r}",
                                   "INVALID_RECORD")
                key = key_s.encode("utf-8", errors="surrogateescape")
                value = value_s.encode("utf-8", errors="surrogateescape")
            else:
                key, value = None, line.encode("utf-8", errors="surrogateescape")
            producer.send(args.topic, value=value, key=key, partition=partition, headers=headers,
                          timestamp=ts).add_done_callback(on_done)
            count += 1
        producer.flush(timeout=args.timeout)
        producer.close()
        if errors:
            raise errors[0]
        print(f"produced {count} record(s) to {args.topic!r}")
        return 0
    finally:
        cluster.shutdown()


def _text(b: Any) -> Any:
    if isinstance(b, (bytes, bytearray)):
        return bytes(b).decode("utf-8", errors="backslashreplace")
    return b


def _jsonable(v: Any) -> Any:
    import datetime

    if isinstance(v, (bytes, bytearray)):
        return _text(v)
    if isinstance(v, datetime.datetime):
        return v.isoformat()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _write_batch(out, tp, batch, args, default_model: bool) -> int:
    import pyarrow as pa

    n = batch.num_rows
    cols = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
    ts = cols["timestamp"].cast(pa.int64()).to_pylist() if "timestamp" in cols else [None] * n
    offsets = cols["offset"].to_pylist()
    if not default_model:  # a topic with its own schema: one JSON object per row
        rows = batch.to_pylist()
        for i, row in enumerate(rows):
            row = {k: _jsonable(v) for k, v in row.items()}
            row["timestamp"] = ts[i]
            row = {"partition": tp.partition, **row}
            out.write(json.dumps(row, default=str).encode() + b"\n")
        return n
    keys = cols["key"].to_pylist()
    values = cols["value"].to_pylist()
    headers = cols["headers"].to_pylist() if "headers" in cols else [None] * n
    sep = (args.key_separator if args.key_separator is not None else "\t").encode()
    for i in range(n):
        if args.json:
            rec = {"partition": tp.partition, "offset": offsets[i], "timestamp": ts[i], "key": _text(keys[i]),
                   "value": _text(values[i]),
                   "headers": None if headers[i] is None else [[h["key"], _text(h["value"])] for h in headers[i]]}
            out.write(json.dumps(rec).encode() + b"\n")
            continue
        value = b"null" if values[i] is None else bytes(values[i])
        if args.print_key:
            key = b"null" if keys[i] is None else bytes(keys[i])
            out.write(key + sep + value + b"\n")
        else:
            out.write(value + b"\n")
    return n


def cmd_consume(args) -> int:
    _console_properties(args, {"print.key", "key.separator"})
    props = _kv_pairs(args.consumer_property, "--consumer-property")
    props["isolation_level"] = args.isolation_level
    props["auto_offset_reset"] = "earliest" if args.from_beginning else props.get("auto_offset_reset", "latest")
    if args.offset is not None and args.partition is None:
        raise CliError("--offset needs --partition", "INVALID_REQUEST")
    if args.max_messages is not None and args.max_messages < 1:
        raise CliError("--max-messages must be >= 1", "INVALID_REQUEST")
    cluster = _connect(args)
    out = sys.stdout.buffer
    count = 0
    try:
        desc, tps = _topic_partitions(cluster.admin(), args.topic, args.partition)
        default_model = desc.schema is None
        consumer = cluster.consumer(props)
        consumer.assign(tps)
        if args.from_beginning and hasattr(consumer, "seek_to_beginning"):
            consumer.seek_to_beginning(tps)
        if args.offset is not None:
            consumer.seek(tps[0], args.offset)
        last_data = time.monotonic()
        try:
            while args.max_messages is None or count < args.max_messages:
                wait = 1.0
                if args.timeout is not None:
                    left = args.timeout - (time.monotonic() - last_data)
                    if left <= 0:
                        break
                    wait = min(wait, left)
                got = consumer.poll(timeout=wait)
                if not got:
                    continue
                last_data = time.monotonic()
                for tp in sorted(got, key=lambda t: t.partition):
                    batch = got[tp]
                    if args.max_messages is not None and count + batch.num_rows > args.max_messages:
                        batch = batch.slice(0, args.max_messages - count)
                    count += _write_batch(out, tp, batch, args, default_model)
                    if args.max_messages is not None and count >= args.max_messages:
                        break
                out.flush()
        except KeyboardInterrupt:
            pass
        out.flush()
        consumer.close()
        print(f"consumed {count} record(s)", file=sys.stderr)
        return 0
    finally:
        cluster.shutdown()


def cmd_verify(args) -> int:
    """Jepsen-style run: workloads + nemesis, final read, history check (exit 1 on any anomaly)."""
    from ..verification.runner import run_verify

    address = _explicit_address(args)
    if address is None and args.attach:
        address, state = _resolve_address(args)
        if address is None:
            raise CliError("--attach: no Ray cluster to attach to", "BROKER_NOT_FOUND")
        _ray_init(address, getattr(args, "namespace", "ray_broker"), local=state is not None)
    elif address is not None:
        _ray_init(address, getattr(args, "namespace", "ray_broker"), local=False)
    try:
        out = run_verify(workload=args.workload, seconds=args.seconds, seed=args.seed, report_path=args.report,
                         faults=args.faults, data_dir=getattr(args, "data_dir", None), address=address,
                         namespace=getattr(args, "namespace", "ray_broker"), fault_interval=args.fault_interval,
                         producers=args.producers, history_path=args.history, nodes=args.nodes)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return 0 if out["valid"] else 1


# ------------------------------------------------------------------------------------------ parser
def _common_parser(with_config: bool) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("global options (may also be given before the command)")
    # SUPPRESS: a value given before the command is not overwritten by the subcommand's default
    g.add_argument("--address", "--bootstrap-server", dest="address", default=argparse.SUPPRESS,
                   help="Ray cluster address host:port (default: $RAY_ADDRESS, else the local head started by "
                        "`ray-broker start`); --bootstrap-server is an alias")
    g.add_argument("--namespace", default=argparse.SUPPRESS,
                   help="Ray namespace of the broker (default: ray_broker)")
    g.add_argument("--data-dir", default=argparse.SUPPRESS,
                   help="broker data directory, used by `start` (default: ./ray_broker_data)")
    if with_config:
        g.add_argument("--config", default=argparse.SUPPRESS, metavar="YAML",
                       help="YAML file of broker configs (BrokerConfig keys, Kafka dotted names), used by `start`")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser(with_config=True)
    common_nc = _common_parser(with_config=False)  # for `topics create`, whose --config is a topic config


    p = argparse.ArgumentParser(
        prog="ray-broker", description="Run and use a ray_broker deployment (Kafka-style broker on Ray + Arrow).",
        epilog="Errors print `error: [CODE] message` on stderr and exit with status 2.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", "--bootstrap-server", dest="address", default=None, help=argparse.SUPPRESS)
    p.add_argument("--namespace", default="ray_broker", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.description += ("\n\nglobal options: --address HOST:PORT (default $RAY_ADDRESS, else the head started by "
                      "`start`), --namespace NS (default ray_broker), --data-dir DIR (start; default "
                      "./ray_broker_data), --config YAML (start; broker configs)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("start", parents=[common], help="deploy the broker (starting a local Ray head if needed)",
                       description="Deploy the broker controller on the Ray cluster at --address / RAY_ADDRESS. "
                                   "Without either, start a local Ray head with `ray start --head` (it keeps "
                                   "running after this command exits; `ray-broker stop` stops it) and deploy "
                                   "there. Idempotent: a running broker is left as it is.")
    s.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local head this command starts")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("stop", parents=[common], help="stop the broker (data stays on disk)",
                       description="Ask the controller to shut the broker down (replica actors are killed, data "
                                   "stays on disk) and kill the controller actor. If the cluster is the local head "
                                   "`ray-broker start` started, stop that head too (only its processes; other "
                                   "Ray instances on the machine are left alone).")
    s.add_argument("--keep-ray", action="store_true", help="leave a local Ray head started by `start` running")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("status", parents=[common], help="controller epoch, nodes, partitions, ISR, lag",
                       description="Show the controller epoch, alive nodes and, per topic partition: leader, "
                                   "replicas, ISR, leader epoch, log start offset, high watermark, size on disk "
                                   "and follower lag (leader high watermark minus follower log end offset).")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("metrics", parents=[common], help="broker metrics in the Prometheus text format",
                       description="Print the broker's metrics once in the Prometheus text format, or serve "
                                   "them over HTTP (--serve PORT) for Prometheus to scrape; each scrape asks "
                                   "every replica for its status. Partition offsets, ISR and under-replicated "
                                   "counts, per-replica request / record / byte counters (reset when a "
                                   "replica restarts), idempotence refusals, consumer group lag, transactions by "
                                   "state and the age of the oldest open one.")
    s.add_argument("--serve", type=_port, default=None, metavar="PORT", help="serve on this port (0: any free one)")
    s.add_argument("--bind", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    s.add_argument("--no-groups", action="store_true", help="leave out consumer groups (one call per group)")
    s.set_defaults(func=cmd_metrics)

    t = sub.add_parser("topics", parents=[common], help="create, list, describe, delete topics",
                       description="Topic administration (like kafka-topics.sh).")
    tsub = t.add_subparsers(dest="topics_command", metavar="SUBCOMMAND")
    tsub.required = True
    c = tsub.add_parser("create", parents=[common_nc], help="create a topic",
                        description="Create a topic. Example: ray-broker topics create orders --partitions 3 "
                                    "--replication-factor 3 --config min.insync.replicas=2")
    c.add_argument("name")
    c.add_argument("--partitions", type=int, default=1, help="number of partitions (default 1)")
    c.add_argument("--replication-factor", type=int, default=1, help="replicas per partition (default 1)")
    c.add_argument("--config", dest="config_kv", action="append", metavar="KEY=VALUE",
                   help="topic config, repeatable (e.g. min.insync.replicas=2, retention.ms=3600000)")
    c.add_argument("--if-not-exists", action="store_true", help="succeed if the topic exists already")
    c.set_defaults(func=cmd_topics_create)
    c = tsub.add_parser("list", parents=[common], help="list topics", description="List topic names.")
    c.add_argument("--include-internal", action="store_true", help="also list internal topics (__...)")
    c.set_defaults(func=cmd_topics_list)
    c = tsub.add_parser("describe", parents=[common], help="describe a topic",
                        description="Show a topic's configs and, per partition, leader, replicas, ISR, leader epoch "
                                    "and offsets.")
    c.add_argument("name")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_topics_describe)
    c = tsub.add_parser("delete", parents=[common], help="delete a topic and its data",
                        description="Delete a topic: its replica actors and its data on disk.")
    c.add_argument("name")
    c.set_defaults(func=cmd_topics_delete)

    x = sub.add_parser("transactions", parents=[common], help="list, describe, abort transactions",
                       description="Transaction tooling (like kafka-transactions.sh, KIP-664).")
    xsub = x.add_subparsers(dest="transactions_command", metavar="SUBCOMMAND")
    xsub.required = True
    c = xsub.add_parser("list", parents=[common], help="list transactional ids and their state",
                        description="Every transactional id the coordinators know, with state and partitions.")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_transactions_list)
    c = xsub.add_parser("describe", parents=[common], help="describe one transaction",
                        description="State, partitions, start time, producer id/epoch and timeout of one id.")
    c.add_argument("transactional_id")
    c.set_defaults(func=cmd_transactions_describe)
    c = xsub.add_parser("abort", parents=[common], help="abort a hanging transaction",
                        description="Abort the open transaction of a transactional id (for operators); "
                                    "its producer is fenced.")
    c.add_argument("transactional_id")
    c.set_defaults(func=cmd_transactions_abort)

    g = sub.add_parser("groups", parents=[common], help="list, describe consumer groups; reset their offsets",
                       description="Consumer group tooling (like kafka-consumer-groups.sh).")
    gsub = g.add_subparsers(dest="groups_command", metavar="SUBCOMMAND")
    gsub.required = True
    c = gsub.add_parser("list", parents=[common], help="list consumer groups",
                        description="Every consumer group the group coordinators know, with state and assignor.")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_groups_list)
    c = gsub.add_parser("describe", parents=[common], help="members, assignment, offsets and lag of a group",
                        description="State, generation and members of a group and, per partition, the committed "
                                    "offset, the last stable offset (what read_committed consumers can reach), "
                                    "the lag between them, whether transactional offsets are pending, and the "
                                    "owning member.")
    c.add_argument("group_id")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_groups_describe)
    c = gsub.add_parser("reset-offsets", parents=[common], help="set a group's committed offsets",
                        description="Set the committed offsets of a group for a topic (all partitions, or "
                                    "--partition): to the log start (--to-earliest), the last stable offset "
                                    "(--to-latest) or an offset (--to-offset N, clamped into the log's range). "
                                    "Refused (NON_EMPTY_GROUP) while the group has live members.")
    c.add_argument("group_id")
    c.add_argument("--topic", required=True, help="topic whose offsets to reset")
    c.add_argument("--partition", type=int, default=None, help="only this partition")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--to-earliest", action="store_true", help="the log start offset")
    how.add_argument("--to-latest", action="store_true", help="the last stable offset (end of committed data)")
    how.add_argument("--to-offset", type=int, metavar="N", help="offset N")
    c.add_argument("--dry-run", action="store_true", help="print the new offsets without setting them")
    c.set_defaults(func=cmd_groups_reset_offsets)

    s = sub.add_parser("produce", parents=[common], help="produce lines from stdin (acks=all)",
                       description="Read records from stdin, one per line, and produce them with acks=all. Each "
                                   "line is a value; with --key-separator SEP, `key SEP value`; with --json, an "
                                   "object {\"key\":..., \"value\":..., \"headers\": {...}, \"partition\": N}. "
                                   "Blank lines are skipped. Prints the count at the end.")
    s.add_argument("topic")
    s.add_argument("--key-separator", default=None, metavar="SEP", help="split each line into key SEP value")
    s.add_argument("--json", action="store_true", help="lines are JSON objects with key/value/headers")
    s.add_argument("--partition", type=int, default=None, help="write every record to this partition")
    s.add_argument("--producer-property", action="append", metavar="KEY=VALUE",
                   help="producer config, repeatable (e.g. linger.ms=10)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for acknowledgements at the end")
    s.add_argument("--property", action="append", metavar="KEY=VALUE",
                   help="kafka-console-producer style: parse.key=true, key.separator=SEP")
    s.set_defaults(func=cmd_produce)

    s = sub.add_parser("consume", parents=[common], help="print records of a topic to stdout",
                       description="Print a topic's records, one per line (the value; with --print-key "
                                   "`key<TAB>value`; with --json one object per record). Topics with their own "
                                   "schema print JSON rows. Ends after --max-messages records, or when no record "
                                   "arrived for --timeout seconds, or on Ctrl-C; the count goes to stderr.")
    s.add_argument("topic")
    s.add_argument("--from-beginning", action="store_true", help="start at the log start (default: the end)")
    s.add_argument("--partition", type=int, default=None, help="read only this partition")
    s.add_argument("--offset", type=int, default=None, help="start at this offset (needs --partition)")
    s.add_argument("--max-messages", type=int, default=None, help="exit after this many records")
    s.add_argument("--timeout", type=float, default=None,
                   help="exit when no record arrived for this many seconds (default: wait forever)")
    s.add_argument("--json", action="store_true", help="print one JSON object per record")
    s.add_argument("--isolation-level", choices=["read_committed", "read_uncommitted"], default="read_committed",
                   help="read_committed (default) or read_uncommitted")
    s.add_argument("--print-key", action="store_true", help="print key<SEP>value (SEP: --key-separator, tab)")
    s.add_argument("--key-separator", default=None, metavar="SEP", help="separator for --print-key (default tab)")
    s.add_argument("--consumer-property", action="append", metavar="KEY=VALUE",
                   help="consumer config, repeatable (e.g. max.partition.fetch.bytes=1048576)")
    s.add_argument("--property", action="append", metavar="KEY=VALUE",
                   help="kafka-console-consumer style: print.key=true, key.separator=SEP")
    s.set_defaults(func=cmd_consume)

    s = sub.add_parser("verify", parents=[common], help="Jepsen-style verification run (workloads + faults + checker)",
                       description="Run verification workloads (queue: idempotent producers; txn: transactional "
                                   "producers; copier: consumer-group read-process-write transactions; all: every one) with read_committed / read_uncommitted consumers while a "
                                   "nemesis injects faults, then read every partition back and check the history "
                                   "for lost writes, duplicates, aborted / dirty reads, skips, inconsistent offsets "
                                   "torn transactions and lost / duplicated copier offset commits. Without --address / RAY_ADDRESS it runs on its own "
                                   "embedded Ray + broker (data in --data-dir, default a temp dir). Prints the "
                                   "anomaly table; exit status 1 on any anomaly. See docs/verification.md.")
    s.add_argument("--workload", default="all", help="queue, txn, copier or all (comma-separated list allowed)")
    s.add_argument("--seconds", type=float, default=60.0, help="how long the workloads run (default 60)")
    s.add_argument("--seed", type=int, default=0, help="seed for the workloads and the fault schedule")
    s.add_argument("--report", default=None, metavar="FILE.json",
                   help="write the report here (the history goes to FILE.json.history.jsonl)")
    s.add_argument("--history", default=None, metavar="FILE.jsonl", help="write the history here instead")
    s.add_argument("--faults", default=None,
                   help="comma-separated fault kinds: kill_leader, kill_follower, kill_txn_coordinator, "
                        "kill_group_coordinator, kill_controller, kill_client, pause, restart_broker, "
                        "restart_cluster; 'all'; 'none' (default: kill_leader, kill_follower, "
                        "kill_txn_coordinator, kill_controller, kill_client, pause)")
    s.add_argument("--fault-interval", type=float, default=5.0, help="mean seconds between faults (default 5)")
    s.add_argument("--producers", type=int, default=3, help="producers per workload (default 3)")
    s.add_argument("--nodes", type=int, default=1,
                   help="run on a multi-node ray.cluster_utils.Cluster of this many one-CPU nodes on this machine "
                        "(embedded only; enables the remove_node / add_node faults; default 1)")
    s.add_argument("--attach", action="store_true",
                   help="run against the broker of the local head made by `ray-broker start` (no restart_cluster)")
    s.set_defaults(func=cmd_verify)
    return p


def _error_line(exc: BaseException) -> str:
    from ..client.metadata_cache import unwrap_error
    from ..errors import BrokerError

    exc = unwrap_error(exc)
    if isinstance(exc, CliError):
        return f"error: [{exc.code}] {exc.message}"
    if isinstance(exc, BrokerError):
        return f"error: [{exc.code.name}] {exc.message}"
    cause = getattr(exc, "cause", None)  # a Ray task error wrapping something else
    if cause is not None and cause is not exc:
        exc = cause
    msg = (str(exc).strip().splitlines() or [""])[-1] or type(exc).__name__
    return f"error: [UNKNOWN_SERVER_ERROR] {type(exc).__name__}: {msg}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - quiet the interpreter's final flush
        except OSError:
            pass
        return 0
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - one line, no traceback
        if os.environ.get("RAY_BROKER_DEBUG"):
            import traceback

            traceback.print_exc()
        print(_error_line(exc), file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
