"""An in-process stand-in for Flower's Grid, to test the server loop and the
client handlers without Ray: messages go straight to a ClientApp per node, each
with its own persistent Context (as Flower keeps ``ctx.state`` per node)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True, scope="session")
def _task_identity() -> None:
    """Building a Message outside Flower's runtime needs a task identity."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


class FakeGrid:
    """Delivers each message to ``apps[node]`` and returns its reply.

    ``fail`` maps a node id to a predicate on the round: when true, the node
    answers with an error (as Flower does when a ClientApp raises); ``silent``
    nodes never answer in the rounds their predicate selects; ``lost`` nodes run
    their ``train`` message in the rounds their predicate selects (they train and
    spend) but their reply never reaches the server.
    """

    def __init__(
        self,
        apps: dict[int, ClientApp],
        fail: dict[int, Callable[[int], bool]] | None = None,
        silent: dict[int, Callable[[int], bool]] | None = None,
        run_config: dict | None = None,
        crash_at_round: int | None = None,
        lost: dict[int, Callable[[int], bool]] | None = None,
    ) -> None:
        self.apps = apps
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": len(apps)},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node in enumerate(apps)
        }
        self.fail = fail or {}
        self.silent = silent or {}
        self.lost = lost or {}
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.crash_at_round = crash_at_round

    def get_node_ids(self) -> list[int]:
        return list(self.apps)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        messages = list(messages)
        if messages and self.crash_at_round == int(messages[0].metadata.group_id or 0):
            raise RuntimeError("injected server crash")
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            rnd = int(msg.metadata.group_id or 0)
            if self.silent.get(node, lambda r: False)(rnd):
                continue
            if self.fail.get(node, lambda r: False)(rnd):
                replies.append(Message(Error(code=1, reason="injected failure"), reply_to=msg))
                continue
            try:
                reply = self.apps[node](msg, self.contexts[node])
            except Exception as exc:  # mirror Flower: an error becomes an error reply
                reply = Message(Error(code=2, reason=repr(exc)), reply_to=msg)
            if msg.metadata.message_type == "train" and self.lost.get(node, lambda r: False)(rnd):
                continue  # it ran; its reply never arrives
            replies.append(reply)
        self.replies.extend(replies)
        return replies


def assert_no_update_in_clear(replies) -> None:
    """No reply carries a hospital's weights, example count or training metrics in clear."""
    from bract.flower.records import LOCAL_METRICS, LOCAL_WEIGHTS, TRAIN_INFO

    for reply in replies:
        if reply.has_error():
            continue
        assert LOCAL_WEIGHTS not in reply.content.array_records
        assert TRAIN_INFO not in reply.content.metric_records
        assert LOCAL_METRICS not in reply.content.metric_records


def write_operator_files(tmp_path, federation_id: str, n: int, policy=None):
    """Play ``n`` hospitals' operators: each gets an identity key, its own roster copy
    and (optionally) ``policy`` as its policy file; returns their node configs and the
    coordinator's roster copy."""
    from bract.flower.secagg_client import make_identities, write_identity_key
    from bract.records.roster import Roster, write_roster

    roster, identities = make_identities(n, federation_id)
    doc = Roster(federation_id, roster, {i + 1: f"hospital-{i}" for i in range(n)})
    write_roster(tmp_path / "server-roster.json", doc)
    configs = []
    for i, ident in enumerate(identities):
        d = tmp_path / f"op-{i}"
        d.mkdir()
        write_identity_key(d / "identity.key", ident.signing_key)
        write_roster(d / "roster.json", doc)
        cfg = {"secagg-id": i + 1, "identity-key": str(d / "identity.key"),
               "roster": str(d / "roster.json"), "state-dir": str(d / "state")}
        if policy is not None:
            policy.write(d / "policy.json")
            cfg["policy"] = str(d / "policy.json")
        configs.append(cfg)
    return configs, tmp_path / "server-roster.json"
