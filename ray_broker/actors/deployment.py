"""Starting the controller, and bringing it back if someone `ray.kill`s it.

The deployment's arguments are kept in Ray's internal KV store, so any broker actor can recreate
the controller under its name from the same data directory (its state comes back from disk).
"""
from __future__ import annotations

import json
import logging

import ray
from ray.experimental import internal_kv

from ..protocol import CONTROLLER_NAME
from .naming import head_node_id

log = logging.getLogger(__name__)


def _kv_key(namespace: str) -> bytes:
    return f"ray_broker/{namespace}/deployment".encode()


def start_controller(namespace: str, data_dir: str, broker_config: dict, timeout_s: float = 60.0):
    from .controller_actor import Controller, controller_options

    internal_kv._internal_kv_put(_kv_key(namespace), json.dumps(
        {"data_dir": data_dir, "config": broker_config}).encode(), overwrite=True)
    handle = Controller.options(**controller_options(namespace, head_node_id()), get_if_exists=True).remote(
        data_dir, broker_config, namespace)
    ray.get(handle.ping.remote(), timeout=timeout_s)
    return handle


def ensure_controller(namespace: str):
    """The controller's handle; recreated from the stored deployment if it is gone."""
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=namespace)
    except ValueError:
        pass
    raw = internal_kv._internal_kv_get(_kv_key(namespace))
    if raw is None:
        return None
    spec = json.loads(raw)
    log.warning("controller for namespace %s is gone; recreating it from %s", namespace, spec["data_dir"])
    from .controller_actor import Controller, controller_options

    return Controller.options(**controller_options(namespace, head_node_id()), get_if_exists=True).remote(
        spec["data_dir"], spec["config"], namespace)
