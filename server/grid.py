"""A Grid that collects replies as soon as they arrive.

Flower 1.41's deployment Grid (``HttpGrid``) pushes a round's messages and then checks for
replies every 3 s, so every round (and node discovery) waits 1.5 s on average after its last
reply. This wrapper sends through the wrapped Grid and polls its public ``pull_messages``
every 0.1 s. (The simulation's ``InMemoryGrid`` already polls every 0.1 s.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.1


class PromptGrid(Grid):
    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    def set_run(self, run) -> None:  # noqa: ANN001
        self.inner.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):  # noqa: ANN201
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.time() < deadline):
            arrived = list(self.inner.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if pending:
                time.sleep(POLL_SECONDS)
        return replies
