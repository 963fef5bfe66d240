"""Flower engine: the same strategies, rounds, checks and checkpoints, with clients behind Flower messages.

Server side: the embedded engine's round logic with another transport (:class:`FlowerTransport`): each
round's instructions become one Flower ``Message`` per client (its own payload as an ``ArrayRecord``, its
plan, i.e. generic settings and the method's hook objects, as JSON in a ``ConfigRecord``), sent through the
``Grid``; the replies come back the same way (adapter as an
``ArrayRecord``, metrics as a ``MetricRecord``). Nothing is pickled: ArrayRecords carry raw tensor bytes.
In a deployment, before round 1 the server sends a ``query`` message to every node and learns which data
partition it holds and its rank budget (``flower-supernode --node-config "partition-id=3 rank-budget=8"``);
in Flower's simulation the nodes are slots, one per client a round samples, and each message names its client
(``assigned`` routing: nothing is asked, so 100,000 clients cost a round what 100 do).

Client side (:func:`client_app`): a Flower ``ClientApp`` holding a :class:`~fedlora.client.node.ClientNode`
(data, model, adapters: built once per process and config and kept across messages by
:func:`~fedlora.engine.flower.apps.process_node`; no server part) that answers ``query`` and ``train``. The strategies know nothing of Flower; Flower knows nothing of the
strategies; this module knows nothing of the runner (the runner passes in what to run).
"""

from fedlora.engine.flower.apps import (
    APP_KEYS,
    client_app,
    config_from_run_config,
    scalar_fields,
    server_app,
)
from fedlora.engine.flower.environment import FLOWER_ENV, flower_log_level, quiet_flower
from fedlora.engine.flower.simulation import check_ray_disk, run_flower_simulation
from fedlora.engine.flower.transport import FlowerTransport, from_arrays, to_arrays

__all__ = [
    "APP_KEYS",
    "FLOWER_ENV",
    "FlowerTransport",
    "check_ray_disk",
    "client_app",
    "config_from_run_config",
    "flower_log_level",
    "from_arrays",
    "quiet_flower",
    "run_flower_simulation",
    "scalar_fields",
    "server_app",
    "to_arrays",
]
