"""A Flower ``Grid`` whose nodes are ClientApp calls in this process: the server's messages reach a real
ClientApp (its mods, SecAgg+'s included) without a SuperLink, Ray or sockets, so every stage of a Flower round
runs in a unit test in seconds. A node can be told to fall silent after some messages (a stopped client)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any
from uuid import uuid4

#: the first node id (the SuperLink's own is 1)
FIRST_NODE = 101


def in_process_grid(app: Any, num_nodes: int, answers: dict[int, int] | None = None) -> Any:
    """A grid of ``num_nodes`` nodes (ids from :data:`FIRST_NODE` on), each with its own Flower ``Context`` kept across
    messages, answered by ``app`` (a ClientApp) as they are pushed. ``answers``: node id -> how many train
    messages it answers before it stops (no reply to any later one)."""
    from flwr.app import Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp.grid import Grid
    from flwr.supercore.task_identity import TaskIdentity

    if (
        TaskIdentity._run_id is None
    ):  # a ServerApp's runtime sets these: the run and the sender of its messages
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    class InProcessGrid(Grid):
        def __init__(self) -> None:
            self.contexts = {
                node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                for node in range(FIRST_NODE, FIRST_NODE + num_nodes)
            }
            self.budget = dict(answers or {})
            self.waiting: dict[str, Any] = {}
            self._run: Any = None

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(
            self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
        ) -> Any:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> Iterable[int]:
            return list(self.contexts)

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            ids = []
            for message in messages:
                message.metadata.__dict__["_message_id"] = str(uuid4())
                ids.append(message.metadata.message_id)
                node = message.metadata.dst_node_id
                if message.metadata.message_type == "train" and node in self.budget:
                    if self.budget[node] <= 0:
                        continue  # stopped: this message is never answered
                    self.budget[node] -= 1
                self.waiting[message.metadata.message_id] = self._answer(message, self.contexts[node])
            return ids

        @staticmethod
        def _answer(message: Any, context: Any) -> Any:
            try:  # copies, as the wire makes them: the server may send one content object to every node
                return copy.deepcopy(app(copy.deepcopy(message), context))
            except Exception as err:  # as a SuperNode returns a ClientApp exception: an error reply
                from flwr.app import Error

                return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            return [self.waiting.pop(i) for i in list(message_ids) if i in self.waiting]

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
            return self.pull_messages(self.push_messages(messages))

    return InProcessGrid()
