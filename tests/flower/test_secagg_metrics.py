"""Metrics released in aggregate under secure aggregation: the server decodes the
exact total of the hospitals' released (noised) sums, never a clipped one.

Each hospital here is a ClientApp with bract's real secure-aggregation mod and stage
handlers around a train handler that returns a chosen update, weight and metrics
release; the server is bract's :class:`SecureAggregator` over a fake grid.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.flower.records import (
    AGGREGATED_METRICS,
    GLOBAL_WEIGHTS,
    LOCAL_METRICS,
    LOCAL_WEIGHTS,
    TRAIN_INFO,
    weights_digest,
    weights_to_record,
)
from bract.flower.secagg_client import make_identities, register_secagg, secagg_mod
from bract.flower.secagg_server import SecAggSettings, SecureAggregator
from bract.secagg import ClientPolicy

from .conftest import FakeGrid

NODES = [2001, 2002, 2003, 2004, 2005]
GLOBAL = {"w": np.zeros(3, np.float32)}


def _app(identity, releases: dict[int, tuple[int, list[float]]]) -> ClientApp:
    """A hospital whose train handler returns a small update, the weight and the released
    sums ``releases[round]`` (the secagg mod takes them out of the reply)."""
    app = ClientApp()

    def train(msg: Message, ctx) -> Message:
        weight, released = releases[int(msg.metadata.group_id)]
        content = RecordDict()
        content.array_records[LOCAL_WEIGHTS] = weights_to_record(
            {"w": np.full(3, 0.5, np.float32)})
        content.metric_records[TRAIN_INFO] = MetricRecord({"num-examples": weight})
        content.metric_records[LOCAL_METRICS] = MetricRecord(
            dict(zip(AGGREGATED_METRICS, released, strict=True)))
        return Message(content, reply_to=msg)

    app.train(mods=[secagg_mod(identity, release_metrics="aggregate")])(train)
    register_secagg(app, identity)
    return app


class _Hooks:
    """The round loop's part, as the FedAvg server plays it (no training of its own)."""

    def __init__(self, rnd: int, next_nodes):
        self.rnd, self._next, self.dropped = rnd, next_nodes, {}

    def train_content(self, node, content):
        content.array_records[GLOBAL_WEIGHTS] = weights_to_record(GLOBAL)

    def on_train_reply(self, node, reply):
        return True

    def on_missing(self, node):
        pass

    def on_dropped(self, node, reason):
        self.dropped[node] = reason

    def label(self, node):
        return f"node-{node}"

    def note(self, text):
        pass

    def next_nodes(self):
        return self._next

    def input_digest(self):
        return weights_digest(GLOBAL)


def _federation(releases: dict[int, dict[int, tuple[int, list[float]]]], **settings):
    roster, identities = make_identities(len(NODES), "metrics-fed")
    identities = [i.__class__(i.node, i.signing_key, i.roster, i.federation_id,
                              ClientPolicy(colluders=0, clip_out_of_range=True))
                  for i in identities]
    grid = FakeGrid({node: _app(identities[k], releases[node]) for k, node in enumerate(NODES)})
    agg = SecureAggregator(grid, SecAggSettings(
        "metrics-fed", roster, colluders=0, aggregate_metrics=len(AGGREGATED_METRICS),
        **settings))
    return agg


def _totals(result) -> np.ndarray:
    """The metric totals as the FedAvg server reads them: the coordinates after the
    model's."""
    return result.weighted_sum[GLOBAL["w"].size:]


# Released sums of hospitals with few records: the noise (std 69 on a loss sum, 17 on
# a count at the default sigma_m = 10) dwarfs the weight.
_released = st.lists(st.floats(-600.0, 600.0, allow_nan=False), min_size=5, max_size=5)
_hospital = st.tuples(st.integers(1, 6), _released)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(_hospital, _hospital), min_size=5, max_size=5))
def test_the_decoded_metric_totals_are_the_sums_of_the_released_sums(draws) -> None:
    """Property: for any weights and released sums within the round's range, the totals
    the server decodes equal the sums of the hospitals' released sums within the
    round's error bound, in a round opened by config and in the pipelined next one."""
    releases = {node: {1: draws[k][0], 2: draws[k][1]} for k, node in enumerate(NODES)}
    agg = _federation(releases)
    for rnd, after in ((1, NODES), (2, None)):
        hooks = _Hooks(rnd, after)
        result, info = agg.run_round(rnd, NODES, GLOBAL["w"].size + len(AGGREGATED_METRICS),
                                     hooks)
        assert result is not None and not hooks.dropped, (info.aborted, hooks.dropped)
        expect = np.sum([releases[n][rnd][1] for n in NODES], axis=0)
        assert np.max(np.abs(_totals(result) - expect)) <= info.error_bound
        # The update's mean is still the weighted mean.
        assert np.allclose(result.mean()[:3], 0.5, atol=info.error_bound)
    assert info.stages == 3  # round 2 was pipelined: its metrics went at the mask request


def test_a_released_sum_beyond_the_range_leaves_the_round_instead_of_being_clipped() -> None:
    """With max_weight 4 and clip 8 the range is +-32: a hospital whose released loss sum
    is 50 leaves the round before it shares, and the totals are exactly the others'."""
    small = [10.0, 3.0, -20.0, 1.0, 2.0]
    releases = {node: {1: (2, small)} for node in NODES}
    releases[NODES[0]] = {1: (2, [50.0, 3.0, -20.0, 1.0, 2.0])}
    agg = _federation(releases, max_weight=4)
    hooks = _Hooks(1, None)
    result, info = agg.run_round(1, NODES, GLOBAL["w"].size + len(AGGREGATED_METRICS), hooks)
    assert result is not None, info.aborted
    assert "beyond the secure round's range [-32, 32]" in hooks.dropped[NODES[0]]
    assert NODES[0] not in result.alive and len(result.alive) == 4
    assert np.max(np.abs(_totals(result) - 4 * np.asarray(small))) <= info.error_bound
