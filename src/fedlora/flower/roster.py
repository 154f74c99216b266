"""Which SuperNode holds which partition: the server asks, since it cannot read node config.

A roll call is one ``query`` message per node not yet known; each ClientApp answers with its
partition id, the partition count and the rank it declared. A node that reconnects (a new
node id) is asked on the next roll call and replaces the old one for its partition.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedlora.config import ConfigError
from fedlora.flower.client_app import NODE


@dataclass
class NodeInfo:
    node_id: int
    partition: int
    rank: int | None  # declared in the node config; None = the config's rank
    own_data: bool


@dataclass
class Roster:
    num_partitions: int
    nodes: dict[int, NodeInfo] = field(default_factory=dict)  # partition → its current node
    online: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)  # node id → why it did not answer (asked again next time)

    def node_of(self, partition: int) -> NodeInfo | None:
        """The live node holding a partition, or None."""
        info = self.nodes.get(partition)
        return info if info is not None and info.node_id in self.online else None

    def call(self, grid: Grid, timeout: float) -> None:
        """Ask every connected node not yet known which partition it holds."""
        self.online = set(grid.get_node_ids())
        known = {info.node_id for info in self.nodes.values()}
        new = sorted(self.online - known)
        if not new:
            return
        ask = [Message(RecordDict({"ask": ConfigRecord({"what": "partition"})}), dst_node_id=n, message_type=MessageType.QUERY, group_id="roll-call") for n in new]
        for reply in grid.send_and_receive(ask, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failed[node] = f"{reply.error.code}: {reply.error.reason}"
                log(WARNING, "node %d did not answer the roll call: %s", node, self.failed[node])
                continue
            self.failed.pop(node, None)
            info = reply.content.config_records[NODE]
            k, n = int(info["partition-id"]), int(info["num-partitions"])
            if n != self.num_partitions:
                raise ConfigError(f"node {node}: num-partitions={n} but federation.num_clients={self.num_partitions} (accepted: equal)")
            if (old := self.nodes.get(k)) is not None and old.node_id in self.online and old.node_id != node:
                log(WARNING, "partition %d: node %d replaces node %d, which is still connected", k, node, old.node_id)
            rank = int(info["rank"]) or None
            self.nodes[k] = NodeInfo(node, k, rank, bool(info["own-data"]))
            log(INFO, "partition %d is on node %d%s", k, node, f" (rank {rank})" if rank else "")

    def wait_for_all(self, grid: Grid, timeout: float) -> None:
        """Roll calls until every partition 0..N−1 has a live node, or ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.call(grid, timeout=max(1.0, deadline - time.monotonic()))
            missing = [k for k in range(self.num_partitions) if self.node_of(k) is None]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"after {timeout:.0f} s no SuperNode holds partition(s) {missing} of {self.num_partitions} "
                    f"(connected: {len(self.online)}; start one per partition with --node-config 'partition-id=K num-partitions={self.num_partitions}')"
                )
            time.sleep(1.0)

    def ranks(self, configured: list[int]) -> list[int]:
        """The config's ranks with every node-declared rank in its place."""
        return [info.rank if (info := self.nodes.get(k)) is not None and info.rank else r for k, r in enumerate(configured)]
