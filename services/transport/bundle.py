"""One run's Redis, as the components use it: its key names, streams, flags and state."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from services.transport.control import RunControl
from services.transport.keys import RunKeys
from services.transport.queue import StreamQueue
from services.transport.state import RunState


@dataclass(frozen=True)
class Transport:
    """Everything a component needs of a run's Redis; build it with :meth:`open`."""

    client: redis.Redis
    keys: RunKeys
    queue: StreamQueue
    control: RunControl
    state: RunState

    @classmethod
    def open(cls, client: redis.Redis, namespace: str) -> Transport:
        """The run ``namespace`` on ``client`` (which must use ``decode_responses=False``)."""
        keys = RunKeys(namespace)
        return cls(
            client=client,
            keys=keys,
            queue=StreamQueue(client, keys),
            control=RunControl(client, keys),
            state=RunState(client, keys),
        )

    @property
    def namespace(self) -> str:
        return self.keys.namespace

    def backlogs(self) -> dict[str, int]:
        """Queued entries of each stream: groups, batches, dead letters."""
        return {
            "groups": self.queue.backlog(self.keys.groups),
            "batches": self.queue.backlog(self.keys.batches),
            "dead": self.queue.backlog(self.keys.dead),
        }

    def close(self) -> None:
        self.client.close()
