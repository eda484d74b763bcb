"""Secure-aggregation audit: real rounds pass; broken masking and tampered views fail."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.audit import secagg_audit as sa
from bract.audit.secagg_audit import (
    CHECKS,
    ROUND_CHECKS,
    SecAggAuditConfig,
    audit_view,
    audit_views,
    record_rounds,
    write_secagg_report,
)
from bract.audit.uniformity import independence_test, uniformity_test
from bract.cli import main
from bract.secagg import shamir
from bract.secagg.crypto import KeystreamAccumulator, SigningKey, keystream, x25519_shared
from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.encoding import EncodingConfig, encode
from bract.secagg.errors import AuthenticationError
from bract.secagg.messages import MaskedInput, MaskRequest, UnmaskReply, UnmaskRequest
from bract.secagg.protocol import ClientPolicy, ClientSession, ServerSession
from bract.secagg.recording import RecordingServerSession, ServerView, read_view, write_view

SMALL = SecAggAuditConfig(clients=6, dim=4000, dropouts=2)


def _by_name(checks):
    return {c.name: c for c in checks}


@pytest.fixture(scope="module")
def view() -> ServerView:
    (v,) = record_rounds(SMALL)
    return v


def _replace_masked(view: ServerView, node: int, data: np.ndarray, direction: str = "in"):
    """A copy of ``view`` whose masked input of ``node`` carries ``data`` instead."""
    messages = []
    for d, m in view.messages:
        if d == direction and isinstance(m, MaskedInput) and m.node_id == node:
            m = dataclasses.replace(m, data=data.tobytes())
        messages.append((d, m))
    return dataclasses.replace(view, messages=messages)


def _encoding(view: ServerView, node: int) -> np.ndarray:
    cfg = view.config
    x, w = view.inputs[node]
    enc = EncodingConfig(cfg.clip, cfg.frac_bits, cfg.max_weight, cfg.ring_bits)
    return encode(x, w, enc, cfg.ring_bits)


def _publics(view: ServerView) -> dict[int, bytes]:
    return {u: m.mask_public for u, (m,) in view.share_messages.items()}


# ------------------------------------------------------------------- real rounds


def test_real_round_with_dropouts_passes_every_check(view) -> None:
    checks = _by_name(audit_views([view]).checks)
    assert set(checks) == set(CHECKS)
    assert set(_by_name(audit_view(view))) == set(ROUND_CHECKS)
    assert all(c.passed for c in checks.values()), [c.detail for c in checks.values()]
    ureq = view.unmask_request
    assert len(ureq.dropped) == 2 and len(ureq.alive) == 4
    # every survivor, every received masked input and both late inputs were tested
    assert len(checks["masked-inputs-uniform"].statistics) == 4
    assert len(checks["survivors-hidden"].statistics) == 4
    assert len(checks["dropped-late-hidden"].statistics) == 2
    assert checks["aggregate-exact"].statistics[0]["remainders_sum_to_aggregate"]


@pytest.mark.parametrize(
    "config",
    [
        SecAggAuditConfig(clients=10, dim=3000, dropouts=2, graph="harary"),
        SecAggAuditConfig(clients=5, dim=3000, dropouts=1, rounds=2),
        SecAggAuditConfig(clients=4, dim=3000, dropouts=1, frac_bits=30, max_weight=2**20),
        SecAggAuditConfig(clients=7, dim=3000, dropouts=2, drop_stage="unmask"),
        SecAggAuditConfig(clients=5, dim=500, dropouts=1, rounds=4),
    ],
    ids=["harary", "two-rounds", "ring-64", "drop-at-unmask", "four-rounds-dropout-each"],
)
def test_other_settings_pass(config) -> None:
    views = record_rounds(config)
    report = audit_views(views, config.alpha)
    assert report.passed, [c.detail for c in report.checks if not c.passed]
    assert report.rounds == config.rounds
    if config.frac_bits == 30:
        assert views[0].config.ring_bits == 64


@pytest.mark.parametrize("fail_at", ["messages", "aggregate"])
def test_a_round_whose_write_stops_part_way_leaves_no_round_behind(
        view, tmp_path, monkeypatch, fail_at) -> None:
    # A stop (here an error) while a round's view is written leaves no round-N for the
    # audit to misread as a whole round; the next write of the round succeeds whole.
    import bract.secagg.recording as recording

    real_savez = np.savez

    def stop(path, **arrays):
        if fail_at == "aggregate" or "inputs" in str(path):
            raise OSError("disk full")
        real_savez(path, **arrays)

    if fail_at == "messages":
        monkeypatch.setattr(recording, "_DIRECTIONS", {})  # writing the first record fails
    else:
        monkeypatch.setattr(recording.np, "savez", stop)
    with pytest.raises((OSError, KeyError)):
        write_view(view, tmp_path / "v" / "round-1")
    monkeypatch.undo()
    assert not (tmp_path / "v" / "round-1").exists()
    with pytest.raises(ValueError, match="no round-"):
        read_view(tmp_path / "v")
    write_view(view, tmp_path / "v" / "round-1")
    (back,) = read_view(tmp_path / "v")
    assert np.array_equal(back.weighted_sum, view.weighted_sum)


def test_view_round_trips_through_files(view, tmp_path) -> None:
    write_view(view, tmp_path / "round-1")
    (back,) = read_view(tmp_path)
    assert [(d, m.to_bytes()) for d, m in back.messages] == [
        (d, m.to_bytes()) for d, m in view.messages]
    assert np.array_equal(back.weighted_sum, view.weighted_sum)
    assert sorted(back.inputs) == sorted(view.inputs)
    assert all(c.passed for c in audit_view(back))


def test_report_files(view, tmp_path) -> None:
    report = audit_views([view])
    paths = write_secagg_report(report, tmp_path, [view])
    assert (tmp_path / "secagg_view" / "round-1" / "messages.bin") in [
        p / "messages.bin" for p in paths]
    data = json.loads((tmp_path / "secagg_audit.json").read_text())
    assert data["passed"] is True and len(data["checks"]) == 5
    md = (tmp_path / "secagg_audit.md").read_text()
    assert md.splitlines()[2].startswith("**Verdict: pass**") and "cannot show" in md


# ------------------------------------------------------------- negative controls


def test_input_sent_in_clear_fails_uniformity(view) -> None:
    u = view.unmask_request.alive[0]
    checks = _by_name(audit_view(_replace_masked(view, u, _encoding(view, u))))
    assert not checks["masked-inputs-uniform"].passed
    assert f"nodes [{u}]" in checks["masked-inputs-uniform"].detail
    # (removing masks that were never applied leaves noise, but then the remainders
    # no longer add up to what the server aggregated)
    assert not checks["aggregate-exact"].passed


def test_missing_pair_masks_expose_the_survivor(view) -> None:
    # The survivor applied its self mask and its pair masks with the clients that later
    # dropped, but none with the other survivors: the masked input still looks uniform,
    # but the server strips the self mask (it learns the seed) and the dropped clients'
    # pair masks (it learns their keys) and sees enc(x).
    u = view.unmask_request.alive[1]
    secrets = sa._reconstruct(view)
    y = _encoding(view, u)
    KeystreamAccumulator(y).add(secrets.self_keys[u])
    for v in view.unmask_request.dropped:
        y = y + sa._pair_mask(view.config, _publics(view), secrets.mask_private[v], v, u, applier=u)
    checks = _by_name(audit_view(_replace_masked(view, u, y)))
    assert checks["masked-inputs-uniform"].passed  # the first check alone would miss it
    assert not checks["survivors-hidden"].passed
    assert f"EXPOSED: nodes [{u}]" in checks["survivors-hidden"].detail
    bad = next(s for s in checks["survivors-hidden"].statistics if s["node"] == u)
    assert not bad["uniformity"]["passed"] and not bad["independence"]["passed"]


def test_late_input_without_self_mask_is_exposed(view) -> None:
    # A dropped client that (wrongly) applied only pair masks: once the server holds
    # its mask key, a late copy of its masked input reveals its update.
    cfg = view.config
    v = view.unmask_request.dropped[0]
    secrets = sa._reconstruct(view)
    y = _encoding(view, v)
    for u in view.sharers:
        if u != v:
            y = y + sa._pair_mask(cfg, _publics(view), secrets.mask_private[v], v, u, applier=v)
    checks = _by_name(audit_view(_replace_masked(view, v, y, direction="late")))
    assert not checks["dropped-late-hidden"].passed
    assert f"EXPOSED: nodes [{v}]" in checks["dropped-late-hidden"].detail


def test_tampered_aggregate_is_caught(view) -> None:
    bad = dataclasses.replace(view, weighted_sum=view.weighted_sum + 1e-3)
    checks = _by_name(audit_view(bad))
    assert not checks["aggregate-exact"].passed
    assert "do NOT sum" in checks["aggregate-exact"].detail


class _WeakMasks(KeystreamAccumulator):
    """A masking bug: only the low 16 bits of each mask element are random."""

    def blocks(self, key: bytes):
        for where, values in super().blocks(key):
            values &= values.dtype.type(0xFFFF)
            yield where, values


def test_weak_masking_in_the_protocol_fails(monkeypatch) -> None:
    # The protocol still works (the server strips the same weak masks), which is why
    # only an audit of the view catches it.
    monkeypatch.setattr("bract.secagg.protocol.KeystreamAccumulator", _WeakMasks)
    (v,) = record_rounds(SMALL)
    checks = _by_name(audit_view(v))
    assert not checks["masked-inputs-uniform"].passed
    assert not checks["survivors-hidden"].passed


def test_malformed_view_files(view, tmp_path) -> None:
    write_view(view, tmp_path)
    raw = (tmp_path / "messages.bin").read_bytes()
    (tmp_path / "messages.bin").write_bytes(raw[:-7])
    with pytest.raises(ValueError, match=r"malformed|truncated"):
        read_view(tmp_path)
    with pytest.raises(ValueError, match="no recorded view"):
        read_view(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no messages\.bin"):
        read_view(tmp_path / "empty")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clients": 2}, "clients"),
        ({"clients": 6, "dropouts": 3}, "between 0 and 2"),
        ({"dim": 10}, "dim"),
        ({"graph": "star"}, "graph"),
        ({"drop_stage": "never"}, "drop_stage"),
    ],
)
def test_bad_config_is_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggAuditConfig(**kwargs)


# ------------------------------------------------------------------ uniformity


@settings(max_examples=25, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), bits=st.sampled_from([32, 64]),
       n=st.integers(200, 5000))
def test_keystreams_pass_and_are_independent_of_any_input(key, bits, n) -> None:
    dtype = np.uint32 if bits == 32 else np.uint64
    v = np.frombuffer(keystream(key, n * bits // 8), dtype=dtype)
    assert uniformity_test(v, bits).passed
    ref = np.sin(np.arange(n) / 7.0)
    assert independence_test(v, bits, ref).passed


@settings(max_examples=25, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), unmasked=st.integers(2, 16))
def test_masks_missing_some_top_bits_fail(key, unmasked) -> None:
    # A mask that leaves the top `unmasked` bits of a small input untouched.
    n = 4000
    ks = np.frombuffer(keystream(key, 4 * n), dtype=np.uint32)
    x = np.full(n, 7, dtype=np.uint32)
    assert not uniformity_test(x + (ks >> np.uint32(unmasked)), 32).passed


def test_correlation_with_the_input_is_detected() -> None:
    n = 20_000
    ks = np.frombuffer(keystream(b"k" * 32, 4 * n), dtype=np.uint32)
    x = np.linspace(-1, 1, n)
    leaky = (x * 2**30).astype(np.int64).astype(np.uint32) + (ks >> np.uint32(3))
    assert not independence_test(leaky, 32, x).passed
    assert independence_test(ks, 32, x).passed
    assert independence_test(ks, 32, np.zeros(n)).note  # nothing to correlate with


def test_uniformity_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="32 or 64"):
        uniformity_test(np.zeros(100, np.uint32), 16)
    with pytest.raises(ValueError, match="at least"):
        uniformity_test(np.zeros(10, np.uint32), 32)
    with pytest.raises(ValueError, match="1-D integer"):
        uniformity_test(np.zeros(100), 32)


# ----------------------------------------------------------------------- CLI


def test_cli_records_checks_and_rechecks_the_view(tmp_path, capsys) -> None:
    out = tmp_path / "a"
    assert main(["audit", "secagg", "--clients", "5", "--dim", "2000", "--dropouts", "1",
                 "--rounds", "2", "--out", str(out)]) == 0
    assert "verdict: pass" in capsys.readouterr().out
    assert (out / "secagg_view" / "round-2" / "messages.bin").exists()
    assert main(["audit", "secagg", "--view", str(out / "secagg_view"),
                 "--out", str(tmp_path / "b")]) == 0
    data = json.loads((tmp_path / "b" / "secagg_audit.json").read_text())
    assert data["rounds"] == 2 and data["passed"]


def test_cli_exits_1_on_a_tampered_view(view, tmp_path, capsys) -> None:
    u = view.unmask_request.alive[0]
    write_view(_replace_masked(view, u, _encoding(view, u)), tmp_path / "v")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--clients", "4", "--dropouts", "2"], "dropouts"),
        (["--view", "/nonexistent/view"], "no recorded view"),
    ],
)
def test_cli_bad_input_exits_2(argv, match, tmp_path, capsys) -> None:
    assert main(["audit", "secagg", *argv, "--dim", "1000", "--out", str(tmp_path)]) == 2
    text = capsys.readouterr().out
    assert "error:" in text and match in text


# ------------------------------------------------- knowledge across rounds (v1 fixture)

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "secagg_v1_dropout_after_sharing"


def _v1_recover_round1_update_of_node_2(views) -> tuple[np.ndarray, int]:
    """What an honest-but-curious server could do with protocol v1 (72e210b): the
    round-1 self-mask seed of node 2 and its epoch mask key, reconstructed in round 2,
    remove every mask from its round-1 input. Key derivations as v1 wrote them."""
    from bract.secagg import shamir
    from bract.secagg.crypto import hkdf
    from bract.secagg.encoding import decode_sum
    from bract.secagg.messages import canonical_encode

    def info(*parts):
        return canonical_encode(["bract/secagg/v1", *parts])

    r1, r2 = views
    cfg1 = next(m.fields for d, m in r1.messages if m.kind == "secagg.round_config")
    fed, t = cfg1["federation_id"], cfg1["threshold"]

    def points(view, kind):  # node 2's shares of the given kind, from view's replies
        return [(shamir.x_coordinate(m.fields["node_id"]), shamir.bytes_to_share(b))
                for d, m in view.messages if m.kind == "secagg.unmask_reply"
                for v, b in zip(m.fields[f"{kind}_owners"], m.fields[f"{kind}_shares"],
                                strict=True) if v == 2]

    seed = shamir.reconstruct(points(r1, "seed"), t).to_bytes(32, "big")
    s_sk = shamir.reconstruct(points(r2, "key"), t).to_bytes(32, "big")
    dtype = np.uint32 if cfg1["ring_bits"] == 32 else np.uint64
    y = np.frombuffer(next(m.fields["data"] for d, m in r1.messages
                           if m.kind == "secagg.masked_input" and m.fields["node_id"] == 2),
                      dtype=dtype).copy()
    n = y.nbytes
    y -= np.frombuffer(keystream(hkdf(seed, info("self-mask", fed, 1, 2)), n), dtype=dtype)
    epochs = dict(zip(cfg1["participants"], cfg1["key_epochs"], strict=True))
    pks = dict(zip(cfg1["participants"], cfg1["mask_publics"], strict=True))
    for u in (0, 1, 3):
        shared = x25519_shared(s_sk, pks[u])
        lo, hi = sorted([(2, epochs[2]), (u, epochs[u])])
        key = hkdf(shared, info("pair-mask", fed, lo[0], lo[1], hi[0], hi[1], 1))
        stream = np.frombuffer(keystream(key, n), dtype=dtype)
        y = y - stream if u > 2 else y + stream  # 2 added PRG for larger peers
    total, weight = decode_sum(y, cfg1["ring_bits"], cfg1["frac_bits"])
    return total / weight, weight


def test_v1_fixture_really_exposes_node_2_in_round_1() -> None:
    """The fixture is what the issue reported: a curious server recovers node 2's
    round-1 update, weight included, from two rounds it ran by the book."""
    views = read_view(FIXTURE_V1)
    assert all(v.legacy for v in views)
    x, w = _v1_recover_round1_update_of_node_2(views)
    truth, truth_w = views[0].inputs[2]
    assert w == truth_w
    assert np.max(np.abs(x - truth)) < 1e-4


def test_knowledge_audit_fails_on_the_v1_fixture_naming_the_exposed_update(capsys,
                                                                           tmp_path) -> None:
    views = read_view(FIXTURE_V1)
    report = audit_views(views)
    assert not report.passed
    knowledge = {c.round: c for c in report.checks if c.name == "knowledge-across-rounds"}
    assert not knowledge[1].passed and "node 2" in knowledge[1].detail
    assert [2] in knowledge[1].statistics[0]["isolable_sums"]
    assert knowledge[2].passed  # round 2 alone exposes nobody
    # each round alone looks fine: only the accumulated knowledge exposes round 1
    assert all(c.passed for v in views for c in sa.knowledge_across_rounds([v]))
    assert main(["audit", "secagg", "--view", str(FIXTURE_V1), "--out", str(tmp_path)]) == 1
    assert "EXPOSED" in capsys.readouterr().out


def test_a_view_with_a_round_missing_fails_naming_it(tmp_path, capsys) -> None:
    """The v1 fixture with round 1 removed passes every other check (round 2 alone
    exposes nobody), but the round whose shares the audit never saw is not counted:
    the view fails ``rounds-recorded`` and the verdict line names the missing round.
    A repeated round fails the same way; a complete view passes naming its rounds."""
    import shutil

    view = tmp_path / "view"
    shutil.copytree(FIXTURE_V1, view)
    shutil.rmtree(view / "round-1")
    report = audit_views(read_view(view))
    assert not report.passed and report.gap == "round 1 missing from the view"
    (gap,) = report.failed
    assert gap.name == sa.ROUNDS_RECORDED and gap.round == 1
    # a v1 view: its per-round checks are listed as not run, not left out
    assert {c.name for c in report.skipped} == set(ROUND_CHECKS)
    assert main(["audit", "secagg", "--view", str(view), "--out", str(tmp_path / "o")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "verdict: FAIL — round 1 missing from the view" in out
    md = (tmp_path / "o" / "secagg_audit.md").read_text()
    assert md.splitlines()[2].startswith("**Verdict: FAIL** (round 1 missing from the view)")
    twice = read_view(FIXTURE_V1)
    assert audit_views([*twice, twice[1]]).gap == "round 2 recorded more than once"
    assert main(["audit", "secagg", "--view", str(FIXTURE_V1), "--out",
                 str(tmp_path / "p")]) == 1  # the fixture's own finding, no gap
    assert "verdict: FAIL (rounds 1 to 2)" in capsys.readouterr().out


def test_protocol_v2_runs_with_a_dropout_after_sharing_every_round_expose_nobody() -> None:
    """The same schedule as the fixture, and harsher, on today's protocol: a different
    client drops after sharing in each of four rounds; every isolable sum holds all the
    alive clients."""
    views = record_rounds(SecAggAuditConfig(clients=5, dim=200, dropouts=1, rounds=4,
                                            seed=3))
    checks = sa.knowledge_across_rounds(views)
    assert all(c.passed for c in checks), [c.detail for c in checks]
    for v, c in zip(views, checks, strict=True):
        assert c.statistics[0]["isolable_sums"] == [sorted(v.unmask_request.alive)]


# ------------------------------------- each client's own sharer list (dishonest server)


class _HidePeers(ServerSession):
    """A dishonest server: the mask request of each node in ``hide`` leaves out the
    given peers (their names, headers and share ciphertexts), so that node masks
    with fewer peers than the others believe it does."""

    hide: dict[int, set[int]]  # node -> the peers left out of its request

    def mask_requests(self) -> dict[int, MaskRequest]:
        reqs = super().mask_requests()
        for u, peers in self.hide.items():
            r = reqs[u]
            keep = [i for i, v in enumerate(r.senders) if v not in peers]
            reqs[u] = dataclasses.replace(
                r, sharers=[v for v in r.sharers if v not in peers],
                senders=[r.senders[i] for i in keep], headers=[r.headers[i] for i in keep],
                ciphertexts=[r.ciphertexts[i] for i in keep])
        return reqs


class _RecordedHidePeers(RecordingServerSession, _HidePeers):
    """The recording server logs the requests the dishonest one actually sends."""


def _relaxed_reply(client: ClientSession, alive: set[int]) -> UnmaskReply:
    """The reply ``client`` would send for ``alive`` if it skipped the quorum check
    (seed shares of its alive peers, key shares of the rest, one per peer)."""
    rnd, me = client._round, client.node_id
    peers = [v for v in rnd.nbhd[me] if v == me or v in rnd.received]
    held = {v: rnd.own_shares if v == me else rnd.received[v] for v in peers}
    seed, key = [v for v in peers if v in alive], [v for v in peers if v not in alive]
    return UnmaskReply(rnd.config.federation_id, rnd.config.round, me,
                       seed, [held[v][0] for v in seed], [held[v][1] for v in seed],
                       key, [held[v][2] for v in key], [held[v][3] for v in key])


@functools.cache
def _hidden_peers_view() -> ServerView:
    """The exposing view of the test below (victim 0, t = 3, split unmask views), built
    once: see its docstring."""
    n, victim, hidden = 5, 0, {3, 4}
    keys = {i: SigningKey.generate() for i in range(n)}
    roster = {i: k.public_bytes() for i, k in keys.items()}
    server = _RecordedHidePeers("fed-split", roster, colluders=0)
    server.hide = {victim: hidden}
    clients = {i: ClientSession(i, "fed-split", keys[i], roster, ClientPolicy(colluders=0))
               for i in range(n)}
    for v, c in clients.items():
        server.receive_advertisement(c.advertise_keys(), origin=v)
    cfg = server.start_round(1, range(n), 100)
    assert (cfg.threshold, cfg.min_honest) == (3, 2)
    for v in range(n):
        server.receive_shares(clients[v].handle_round_config(cfg))
    rng = np.random.default_rng(0)  # test data only
    inputs = {v: (rng.uniform(-1, 1, 100).astype(np.float32), 10 + v) for v in range(n)}
    for v, req in server.mask_requests().items():
        server.receive_masked_input(clients[v].handle_mask_request(
            req, *inputs[v], input_digest=SHARED_INPUT_DIGEST))
    views = [({0, 3, 4}, {1, 2}, [3, 4]), ({victim}, {1, 2}, [victim])]
    for alive, dropped, answering in views:
        server.log.append(("out", UnmaskRequest("fed-split", 1, sorted(alive), sorted(dropped),
                                                [], [])))
        server.log += [("in", _relaxed_reply(clients[v], alive)) for v in answering]
    return ServerView(1, list(server.log), np.zeros(100), 0, inputs, aborted=True)


def test_a_victim_whose_sharer_list_hides_peers_is_exposed_and_the_audit_names_it(
        tmp_path, capsys) -> None:
    """Five hospitals, c = 0, t = 3. The recorded server leaves peers 3 and 4 out of
    victim 0's mask request only, so 0 masks with 1 and 2 alone while 3 and 4 mask
    with 0. Split views, answered by clients that skip the quorum check: 3 and 4 see
    (alive {0, 3, 4}, dropped {1, 2}), 0 sees (alive {0}, dropped {1, 2}). The server
    reconstructs 0's seed and the mask keys of 1 and 2: every mask of 0's input, so
    its update alone. An audit that took every client to mask with the union of the
    lists (so 0 with 3 and 4, whose keys stay hidden) passed this view; the audit
    reads each client's own list and fails, naming node 0."""
    view, victim = _hidden_peers_view(), 0
    n = 5
    assert view.sharer_lists[victim] == {0, 1, 2}
    assert all(view.sharer_lists[v] == set(range(n)) for v in range(1, n))

    report = audit_views([view])
    (knowledge,) = report.failed
    assert not report.passed and knowledge.name == "knowledge-across-rounds"
    # unmasked twice: the checks that remove one unmasking's masks are listed as not run
    status = {c.name: c.status for c in report.checks}
    assert status == {"knowledge-across-rounds": "FAIL", "masked-inputs-uniform": "pass",
                      "survivors-hidden": "skipped", "dropped-late-hidden": "skipped",
                      "aggregate-exact": "n/a"}
    assert "EXPOSED" in knowledge.detail and "node 0" in knowledge.detail
    assert knowledge.statistics[0]["isolable_sums"] == [[victim]]
    write_view(view, tmp_path / "v")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "node 0" in capsys.readouterr().out


# ------------------------------------------- rounds the audit cannot fully check


def _unmasked_twice(view: ServerView) -> ServerView:
    """``view`` with a second unmask request (a server that showed some clients another
    alive set: the first survivor dropped), as a dishonest server's view holds it."""
    ureq = view.unmask_request
    again = UnmaskRequest(ureq.federation_id, ureq.round, ureq.alive[1:],
                          sorted([*ureq.dropped, ureq.alive[0]]), [], [])
    return dataclasses.replace(view, messages=[*view.messages, ("out", again)])


def _status(report) -> dict[tuple[int, str], str]:
    return {(c.round, c.name): c.status for c in report.checks}


def test_a_round_unmasked_twice_is_reported_incomplete_never_pass(view, tmp_path,
                                                                  capsys) -> None:
    """A round the server unmasked twice: the checks that remove one unmasking's masks
    cannot run. Each round still lists every check: those that ran (knowledge across
    rounds, the masked inputs' uniformity) with their result, the three others as
    skipped with the reason. The verdict is INCOMPLETE, not pass (exit 1), and the
    verdict line, audit.md's first paragraph and the JSON name the skipped checks and
    their round; the audit used to run none of them and print "pass"."""
    twice = _unmasked_twice(view)
    report = audit_views([twice])
    assert not report.passed  # it used to pass, having run none of the three
    assert _status(report) == {
        (1, "knowledge-across-rounds"): "pass", (1, "masked-inputs-uniform"): "pass",
        (1, "survivors-hidden"): "skipped", (1, "dropped-late-hidden"): "skipped",
        (1, "aggregate-exact"): "skipped"}
    for c in report.skipped:
        assert c.detail.startswith("NOT RUN: the server unmasked this round 2 times")
        assert not c.passed
    assert report.verdict == "INCOMPLETE" and not report.passed and not report.failed
    summary = "3 checks NOT RUN: round 1: survivors-hidden, dropped-late-hidden, aggregate-exact"
    assert report.skipped_summary == summary
    plain = report.to_plain()
    assert plain["verdict"] == "INCOMPLETE" and plain["passed"] is False
    assert plain["skipped"] == summary
    assert [c["status"] for c in plain["checks"]].count("skipped") == 3
    md = sa.report_markdown(report).splitlines()[2]
    assert md.startswith("**Verdict: INCOMPLETE** — no check failed, but the view was not "
                         "fully checked") and summary in md
    write_view(twice, tmp_path / "v")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"verdict: INCOMPLETE (rounds 1 to 1); {summary}" in out
    assert "verdict: pass" not in out


def test_the_checks_that_can_run_on_a_round_unmasked_twice_still_fail_it(view) -> None:
    """A survivor's input sent in clear in a round unmasked twice: the masked inputs'
    uniformity still runs there, and fails; the verdict is FAIL and still names the
    checks not run."""
    u = view.unmask_request.alive[0]
    report = audit_views([_unmasked_twice(_replace_masked(view, u, _encoding(view, u)))])
    assert not report.passed  # it used to pass, having run no per-round check
    (bad,) = report.failed
    assert bad.name == "masked-inputs-uniform" and f"nodes [{u}]" in bad.detail
    assert report.verdict == "FAIL" and len(report.skipped) == 3
    assert sa.report_markdown(report).splitlines()[2].startswith(
        "**Verdict: FAIL** — 3 checks NOT RUN: round 1")


def _cut_before_unmasking(view: ServerView) -> ServerView:
    """``view`` as a round that aborted before unmasking: no unmask request or reply,
    no late input, no aggregate."""
    kept = [(d, m) for d, m in view.messages if d != "late"
            and not isinstance(m, UnmaskRequest | UnmaskReply)]
    return dataclasses.replace(view, messages=kept, weighted_sum=np.zeros_like(
        view.weighted_sum), total_weight=0, aborted=True)


def test_an_aborted_round_is_checked_for_what_it_holds(view) -> None:
    """An aborted round is checked, not passed over: its masked inputs are tested (an
    input sent in clear fails, where the audit used to check nothing in an aborted
    round); with no unmask reply the server removed no mask, so the survivor checks
    have nothing to test (n/a, no qualification of the verdict), and neither has
    aggregate-exact (no aggregate). Aborted after its unmask replies, each survivor
    whose seed they reveal, and each dropped client whose key they reveal, is tested
    as in a completed round."""
    u = view.unmask_request.alive[0]
    clear = audit_views([_cut_before_unmasking(_replace_masked(view, u, _encoding(view, u)))])
    assert not clear.passed and clear.verdict == "FAIL"  # it used to pass
    before = audit_views([_cut_before_unmasking(view)])
    assert _status(before) == {
        (1, "knowledge-across-rounds"): "pass", (1, "masked-inputs-uniform"): "pass",
        (1, "survivors-hidden"): "n/a", (1, "dropped-late-hidden"): "n/a",
        (1, "aggregate-exact"): "n/a"}
    assert before.verdict == "pass" and before.passed
    after = audit_views([dataclasses.replace(view, weighted_sum=np.zeros_like(
        view.weighted_sum), total_weight=0, aborted=True)])
    assert _status(after) == {
        (1, "knowledge-across-rounds"): "pass", (1, "masked-inputs-uniform"): "pass",
        (1, "survivors-hidden"): "pass", (1, "dropped-late-hidden"): "pass",
        (1, "aggregate-exact"): "n/a"}
    hidden = next(c for c in after.checks if c.name == "survivors-hidden")
    assert len(hidden.statistics) == len(view.unmask_request.alive)
    assert after.passed


def test_every_round_lists_every_check_whatever_the_view_holds(view) -> None:
    """Whatever a round's view holds (complete, unmasked twice, aborted before or after
    unmasking, a protocol-v1 view), its result lists each of the five checks exactly
    once, and the verdict is pass only when none is skipped or failed."""
    views = [view, _unmasked_twice(view), _cut_before_unmasking(view),
             dataclasses.replace(view, aborted=True), *read_view(FIXTURE_V1)]
    for v in views:
        report = audit_views([dataclasses.replace(v, round=1)])
        names = [c.name for c in report.checks if c.name != sa.ROUNDS_RECORDED]
        assert sorted(names) == sorted(CHECKS)
        assert report.passed == (not report.failed and not report.skipped)


# ------------------------------------- wrong shares: counted exactly as the server could


def _with(view: ServerView, *extra: tuple[str, object]) -> ServerView:
    """A copy of ``view`` with ``extra`` messages recorded after its own."""
    return dataclasses.replace(view, messages=[*view.messages, *extra])


def _replies(view: ServerView) -> list[UnmaskReply]:
    return view.unmask_replies


@settings(max_examples=60, deadline=None)
@given(sender=st.integers(0, 4), target=st.sampled_from([("key", 1), ("key", 2), ("seed", 0)]),
       delta=st.integers(1, shamir.PRIME - 1), junk=st.binary(max_size=80),
       as_junk=st.booleans(), salt=st.sampled_from(["real", "random"]))
def test_a_reply_with_a_wrong_share_never_hides_what_the_valid_shares_reveal(
        sender, target, delta, junk, as_junk, salt) -> None:
    """Property: one more unmask reply recorded in the exposing view of the hidden-peers
    test, from any node, carrying one wrong share (the right one shifted by any
    non-zero field element, or any bytes at all) of any secret with its real salt or
    another, leaves the audit's finding unchanged: node 0's update, alone, is EXPOSED,
    and the wrong share is named with its sender and round. The audit used to
    interpolate the first t points it saw, and one bogus point hid a mask key the
    server holds from its valid shares: the view passed (or the audit crashed)."""
    base = _hidden_peers_view()
    kind, owner = target
    real = next(r for r in _replies(base) if owner in getattr(r, f"{kind}_owners"))
    i = getattr(real, f"{kind}_owners").index(owner)
    y = shamir.bytes_to_share(getattr(real, f"{kind}_shares")[i])
    share = junk if as_junk else shamir.share_to_bytes((y + delta) % shamir.PRIME)
    the_salt = getattr(real, f"{kind}_salts")[i] if salt == "real" else bytes(32)
    fields = {"seed_owners": [], "seed_shares": [], "seed_salts": [], "key_owners": [],
              "key_shares": [], "key_salts": []}
    fields.update({f"{kind}_owners": [owner], f"{kind}_shares": [share],
                   f"{kind}_salts": [the_salt]})
    bogus = UnmaskReply("fed-split", 1, sender, **fields)
    if share == getattr(real, f"{kind}_shares")[i] and sender == real.node_id:
        return  # not a wrong share: the very one the view already holds
    report = audit_views([_with(base, ("in", bogus))])
    knowledge = report.checks[0]
    assert knowledge.name == CHECKS[0] and knowledge.status == "FAIL", knowledge.detail
    assert knowledge.statistics[0]["isolable_sums"] == [[0]]
    assert "EXPOSED" in knowledge.detail and "node 0" in knowledge.detail
    assert report.verdict == "FAIL"
    assert any(f"round 1: node {sender} sent a {kind} share of node {owner}" in w
               for w in report.wrong_shares), report.wrong_shares


def test_the_reviewers_blinding_reply_is_named_and_the_update_still_exposed(tmp_path,
                                                                           capsys) -> None:
    """The reviewer's case: node 1 sends a wrong share of node 2's mask key (x = 2 sorts
    among the first t points). The view is still EXPOSED, exit 1, and the CLI names
    node 1's wrong share."""
    base = _hidden_peers_view()
    good = next(r for r in _replies(base) if 2 in r.key_owners)
    bogus = dataclasses.replace(good, node_id=1, seed_owners=[], seed_shares=[],
                                seed_salts=[], key_owners=[2],
                                key_shares=[bytes(65) + b"\x07"],
                                key_salts=[good.key_salts[good.key_owners.index(2)]])
    view = _with(base, ("in", bogus))
    knowledge = audit_views([view]).checks[0]
    assert not knowledge.passed and knowledge.statistics[0]["isolable_sums"] == [[0]]
    write_view(view, tmp_path / "v")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert ("wrong share: round 1: node 1 sent a key share of node 2 that does not open "
            "node 2's signed commitment") in out
    data = json.loads((tmp_path / "o" / "secagg_audit.json").read_text())
    assert data["verdict"] == "FAIL" and len(data["wrong_shares"]) == 1
    assert "node 1 sent a key share of node 2" in (tmp_path / "o" / "secagg_audit.md").read_text()


@settings(max_examples=20, deadline=None)
@given(which=st.integers(0, 100), salt=st.binary(min_size=32, max_size=32))
def test_a_right_share_with_a_wrong_salt_still_counts(which, salt) -> None:
    """A share whose salt does not open its commitment but whose value is right is
    still a point a curious server can use (it checks the secret it interpolates
    against the dealer's public key or seed commitment): replacing the salt of any
    one share in the exposing view leaves it EXPOSED, and names that share."""
    base = _hidden_peers_view()
    slots = [(j, kind, i) for j, r in enumerate(_replies(base)) for kind in ("seed", "key")
             for i in range(len(getattr(r, f"{kind}_owners")))]
    j, kind, i = slots[which % len(slots)]
    reply = _replies(base)[j]
    salts = list(getattr(reply, f"{kind}_salts"))
    if salts[i] == salt:
        return
    salts[i] = salt
    changed = dataclasses.replace(reply, **{f"{kind}_salts": salts})
    view = dataclasses.replace(base, messages=[(d, changed if m is reply else m)
                                               for d, m in base.messages])
    report = audit_views([view])
    knowledge = report.checks[0]
    assert knowledge.statistics[0]["isolable_sums"] == [[0]] and not knowledge.passed
    owner = getattr(reply, f"{kind}_owners")[i]
    assert report.wrong_shares == [f"round 1: node {reply.node_id} sent a {kind} share of "
                                   f"node {owner} that does not open node {owner}'s signed "
                                   "commitment"]


CHEATS = ("value", "salt", "not-a-field-element")


def _mask_and_sign(server, clients, inputs, dropped: int):
    """Run a shared round's mask stage (``dropped`` sends nothing) and consistency
    stage between ``server`` and ``clients``; the server's unmask request."""
    for v, req in server.mask_requests().items():
        if v != dropped:
            server.receive_masked_input(clients[v].handle_mask_request(
                req, *inputs[v], input_digest=SHARED_INPUT_DIGEST))
    creq = server.consistency_request()
    for v in creq.alive:
        server.receive_consistency_signature(clients[v].handle_consistency_request(creq))
    return server.unmask_request()



def _keyed_round(fed: str, n: int, dim: int, seed: int):
    """The fixed test keys and their roster, a recording server holding the key
    advertisements of ``n`` clients, the clients, and each one's random test input
    and weight."""
    keys = _cheat_keys()
    roster = {i: k.public_bytes() for i, k in keys.items()}
    server = RecordingServerSession(fed, roster, encoding=EncodingConfig(1.0, 16, 1000))
    clients = {i: ClientSession(i, fed, keys[i], roster, ClientPolicy()) for i in range(n)}
    for v, c in clients.items():
        server.receive_advertisement(c.advertise_keys(), origin=v)
    rng = np.random.default_rng(seed)  # test data only
    inputs = {v: (rng.uniform(-1, 1, dim).astype(np.float32), int(rng.integers(1, 1000)))
              for v in range(n)}
    return keys, roster, server, clients, inputs


def _round_with_a_cheater(cheater: int, kind: str, how: str):
    """A real round recorded by an honest :class:`RecordingServerSession` (n = 6, c = 1,
    t = 4; node 5 drops after sharing) in which ``cheater`` returns one wrong ``kind``
    share (threat model T31): the server excludes it and completes the round from the
    valid shares. Returns the view and the round's result."""
    n, dim, fed = 6, 200, "fed-cheat"
    _, _, server, clients, inputs = _keyed_round(fed, n, dim, cheater)
    cfg = server.start_round(1, range(n), dim)
    assert (cfg.threshold, cfg.colluders) == (4, 1)
    for v in range(n):
        server.receive_shares(clients[v].handle_round_config(cfg))
    dropped = 5
    ureq = _mask_and_sign(server, clients, inputs, dropped)
    excluded = []
    for v in ureq.signers:
        reply = clients[v].handle_unmask_request(ureq)
        if v == cheater:
            owners = getattr(reply, f"{kind}_owners")
            i = owners.index(dropped if kind == "key" else (cheater + 1) % 5)
            shares, salts = list(getattr(reply, f"{kind}_shares")), list(
                getattr(reply, f"{kind}_salts"))
            if how == "value":
                y = shamir.bytes_to_share(shares[i])
                shares[i] = shamir.share_to_bytes((y + 1) % shamir.PRIME)
            elif how == "salt":
                salts[i] = bytes(a ^ 0xFF for a in salts[i])
            else:
                shares[i] = b"\xff" * shamir.SHARE_BYTES
            reply = dataclasses.replace(reply, **{f"{kind}_shares": shares,
                                                  f"{kind}_salts": salts})
        try:
            server.receive_unmask_reply(reply)
        except AuthenticationError:
            excluded.append(v)
    assert excluded == [cheater]
    res = server.finish()
    assert res.excluded == (cheater,) and res.dropped == (dropped,)
    view = ServerView(1, list(server.log), res.weighted_sum, res.total_weight, inputs)
    return view, res


@functools.cache
def _cheat_keys() -> dict[int, SigningKey]:
    return {i: SigningKey.generate() for i in range(6)}


@settings(max_examples=15, deadline=None)
@given(cheater=st.integers(0, 4), kind=st.sampled_from(["seed", "key"]),
       how=st.sampled_from(CHEATS))
def test_an_honest_run_with_a_cheater_the_server_excluded_audits_to_pass_naming_it(
        cheater, kind, how) -> None:
    """Property (threat model T31): in a real recorded round where any one hospital
    returns any kind of wrong share (a shifted value, a wrong salt, not a field
    element) and the server excludes it, the audit passes every check, names the
    cheater's wrong share, and reports exactly the sum the server really isolates:
    that of the round's alive clients. The recording holds the cheater's reply (the
    server logs before it checks), and the audit used to interpolate its bogus point:
    a wrong knowledge (the dropped client's key counted as unknown) and a crash of the
    per-round checks ("the recorded view is inconsistent", exit 2)."""
    view, res = _round_with_a_cheater(cheater, kind, how)
    report = audit_views([view])
    assert report.passed, [c.detail for c in report.checks if not c.passed]
    knowledge = report.checks[0]
    assert knowledge.statistics[0]["isolable_sums"] == [sorted(res.alive)]
    assert knowledge.statistics[0]["keys_reconstructed"] == 1
    assert len(report.wrong_shares) == 1
    assert report.wrong_shares[0].startswith(f"round 1: node {cheater} sent a {kind} share")


def test_the_cli_audits_a_run_with_an_excluded_cheater_to_pass(tmp_path, capsys) -> None:
    view, _ = _round_with_a_cheater(0, "key", "value")
    write_view(view, tmp_path / "v" / "round-1")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "verdict: pass" in out
    assert "wrong share: round 1: node 0 sent a key share of node 5" in out


# ------------------------------------- views the audit cannot read are never a pass


def test_a_round_whose_shares_cannot_be_read_leaves_no_other_round_passing(tmp_path,
                                                                            capsys) -> None:
    """The v1 fixture exposes round 1 only through the mask key round 2's shares
    reveal. With round 2's configuration recorded twice, its shares cannot be read;
    round 1's knowledge check, which used to read "pass" (its exposure unseen), is
    skipped naming round 2, and the verdict is not pass. Missing configuration: the
    same."""
    r1, r2 = read_view(FIXTURE_V1)
    cfg = next(m for d, m in r2.messages if d == "out" and m.kind == "secagg.round_config")
    for broken in (_with(r2, ("out", cfg)),
                   dataclasses.replace(r2, messages=[(d, m) for d, m in r2.messages
                                                     if m is not cfg])):
        report = audit_views([r1, broken])
        assert _status(report)[(1, "knowledge-across-rounds")] == "skipped"
        assert _status(report)[(2, "knowledge-across-rounds")] == "skipped"
        assert report.verdict == "INCOMPLETE" and not report.passed
        first = report.checks[0]
        assert "round 2's shares cannot be read" in first.detail
        assert "round configurations, not one" in first.detail
    write_view(r1, tmp_path / "v" / "round-1")
    write_view(_with(r2, ("out", cfg)), tmp_path / "v" / "round-2")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "verdict: INCOMPLETE" in capsys.readouterr().out


def test_a_current_view_with_its_config_twice_or_missing_is_not_a_pass(view) -> None:
    cfg = view.config
    twice = _with(view, ("out", cfg))
    none = dataclasses.replace(view, messages=[(d, m) for d, m in view.messages
                                               if m is not cfg])
    for v in (twice, none):
        report = audit_views([v])
        assert report.verdict == "INCOMPLETE" and not report.passed
        assert all(c.status == "skipped" for c in report.checks)


def test_a_report_with_no_check_run_is_not_a_pass() -> None:
    """No check ran (no views, or every check n/a): the verdict is INCOMPLETE, never pass;
    ``audit_views`` refuses an empty set of views in one line."""
    assert sa.SecAggAuditReport([], 1e-6, 0).verdict == "INCOMPLETE"
    only_na = [sa.CheckResult.not_applicable(1, name, "nothing") for name in ROUND_CHECKS]
    assert not sa.SecAggAuditReport(only_na, 1e-6, 1).passed
    with pytest.raises(ValueError, match="no recorded rounds"):
        audit_views([])


# ------------------------------------------------- malformed views: never a traceback


@functools.cache
def _dropout_view() -> ServerView:
    (v,) = record_rounds(SecAggAuditConfig(clients=5, dim=200, dropouts=1))
    return v


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_corrupted_share_bytes_never_raise_a_traceback(data) -> None:
    """Property: a recorded view in which any shares of any unmask replies are replaced
    by any bytes (any length, any value, a field element or not) is audited by the
    CLI to a verdict (exit 0 or 1, each replaced share that is not the original named)
    or refused in one ``error:`` line (exit 2), never a traceback. The audit used to
    raise ``OverflowError`` on a secret wider than 256 bits."""
    import tempfile

    base = _dropout_view()
    replies = _replies(base)
    changed, named = {}, set()
    for _ in range(data.draw(st.integers(1, 3), label="shares replaced")):
        j = data.draw(st.integers(0, len(replies) - 1), label="reply")
        reply = changed.get(j, replies[j])
        kinds = [k for k in ("seed", "key") if getattr(reply, f"{k}_owners")]
        kind = data.draw(st.sampled_from(kinds), label="kind")
        shares = list(getattr(reply, f"{kind}_shares"))
        i = data.draw(st.integers(0, len(shares) - 1), label="share")
        new = data.draw(st.one_of(
            st.binary(max_size=80),
            st.integers(0, 2**528 - 1).map(lambda y: y.to_bytes(66, "big"))), label="bytes")
        shares[i] = new
        changed[j] = dataclasses.replace(reply, **{f"{kind}_shares": shares})
    for j, reply in changed.items():
        for kind in ("seed", "key"):
            owners = getattr(reply, f"{kind}_owners")
            named |= {(reply.node_id, kind, owners[i])
                      for i, (a, b) in enumerate(zip(getattr(reply, f"{kind}_shares"),
                                                     getattr(replies[j], f"{kind}_shares"),
                                                     strict=True)) if a != b}
    swap = {id(replies[j]): r for j, r in changed.items()}
    view = dataclasses.replace(base, messages=[(d, swap.get(id(m), m))
                                               for d, m in base.messages])
    with tempfile.TemporaryDirectory() as tmp:
        write_view(view, Path(tmp) / "v")
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["audit", "secagg", "--view", str(Path(tmp) / "v"),
                         "--out", str(Path(tmp) / "o")])
        text = " ".join(out.getvalue().split())
        assert code in (0, 1, 2)
        if code == 2:
            assert "error:" in text
        else:
            for sender, kind, owner in named:
                assert f"node {sender} sent a {kind} share of node {owner}" in text, text


def test_a_view_missing_a_survivors_share_message_is_refused_in_one_line(view, tmp_path,
                                                                        capsys) -> None:
    """A view without the share message (round mask key) of an alive node cannot be the
    record of its round: the CLI says so in one line and exits 2 (it used to end in a
    KeyError traceback)."""
    from bract.secagg.messages import ShareKeys

    u = view.unmask_request.alive[0]
    cut = dataclasses.replace(view, messages=[
        (d, m) for d, m in view.messages if not (isinstance(m, ShareKeys) and m.node_id == u)])
    write_view(cut, tmp_path / "v")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 2
    out = capsys.readouterr().out
    assert "error:" in out and f"lacks the share messages (round mask keys) of nodes [{u}]" in \
        " ".join(out.split())


def test_any_other_inconsistency_of_a_read_view_is_one_line_exit_2(view, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    write_view(view, tmp_path / "v")

    def broken(views, alpha=None, roster=None):
        raise KeyError(7)

    monkeypatch.setattr("bract.audit.secagg_audit.audit_views", broken)
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "is inconsistent and cannot be audited (KeyError: 7)" in out


def test_a_v1_reply_whose_lists_differ_in_length_is_named_not_a_crash() -> None:
    """A protocol-v1 reply carries owners and shares as two lists; one cut short pairs
    no share with a dealer. The audit names it and reads the rest of the view (the
    fixture's finding stands) instead of stopping on the view."""
    from bract.secagg.recording import LegacyMessage

    r1, r2 = read_view(FIXTURE_V1)
    reply = next(m for d, m in r1.messages if m.kind == "secagg.unmask_reply"
                 and len(m.fields["seed_owners"]) > 1)
    cut = LegacyMessage(reply.kind, {**reply.fields,
                                     "seed_shares": reply.fields["seed_shares"][:-1]})
    r1 = dataclasses.replace(r1, messages=[(d, cut if m is reply else m)
                                           for d, m in r1.messages])
    report = audit_views([r1, r2])
    assert report.wrong_shares == [
        f"round 1: node {reply.fields['node_id']} sent seed shares: their lists of owners, "
        "shares and salts differ in length, so none is used"]
    assert report.verdict == "FAIL"  # node 2 of round 1: still EXPOSED by the other shares
    (bad,) = report.failed
    assert bad.round == 1 and [2] in bad.statistics[0]["isolable_sums"]


# ------------------------- several share messages for one node (forged, refused ones)


def _share_messages(view: ServerView) -> dict[int, list]:
    """Every distinct share message recorded in ``view``, by the node it names (read
    from the log itself, not from the code under test)."""
    from bract.secagg.messages import ShareKeys

    out: dict[int, list] = {}
    for d, m in view.messages:
        if d == "in" and isinstance(m, ShareKeys) and m.to_bytes() not in {
                x.to_bytes() for x in out.get(m.node_id, ())}:
            out.setdefault(m.node_id, []).append(m)
    return out


def _forged_share_keys(real, data):
    """A share message that names ``real``'s node but is not ``real``: any of its round
    key, seed commitment, share commitments, holders or signature replaced by anything
    (another node's round key included), as another hospital or a replay could send it."""
    from bract.secagg.messages import ShareKeys

    changes: dict[str, object] = {}
    what = data.draw(st.sets(st.sampled_from(
        ["mask_public", "seed_commitment", "commitments", "holders", "signature"]),
        min_size=1), label="fields replaced")
    if "mask_public" in what:
        changes["mask_public"] = data.draw(st.one_of(
            st.binary(min_size=32, max_size=32), st.binary(max_size=40),
            st.sampled_from([m.mask_public for (m,) in
                             _share_messages(_hidden_peers_view()).values()])), label="key")
    if "seed_commitment" in what:
        changes["seed_commitment"] = data.draw(st.binary(min_size=32, max_size=32),
                                               label="seed commitment")
    holders = list(real.holders)
    if "holders" in what:
        holders = data.draw(st.lists(st.integers(0, 6), unique=True, max_size=6).map(sorted),
                            label="holders")
        changes["holders"] = holders
        changes["ciphertexts"] = [b""] * len(holders)
    if "commitments" in what or "holders" in what:
        for name in ("seed_share_commitments", "key_share_commitments"):
            changes[name] = data.draw(st.binary(min_size=32 * len(holders),
                                                max_size=32 * len(holders)), label=name)
    if "signature" in what:
        changes["signature"] = data.draw(st.binary(min_size=64, max_size=64), label="sig")
    forged = dataclasses.replace(real, **changes)
    assert isinstance(forged, ShareKeys)
    return forged


def _insert_share_keys(view: ServerView, forged, where: str, data=None) -> ServerView:
    """``view`` with ``forged`` share messages recorded just before (``where="before"``)
    or after (``"after"``: at the end of the log, or at any later point with ``data``)
    the real share message of the node they name."""
    from bract.secagg.messages import ShareKeys

    node = forged[0].node_id
    at = next(i for i, (d, m) in enumerate(view.messages)
              if d == "in" and isinstance(m, ShareKeys) and m.node_id == node)
    if where == "after":
        at = (len(view.messages) if data is None else
              data.draw(st.integers(at + 1, len(view.messages)), label="logged at"))
    return dataclasses.replace(view, messages=[*view.messages[:at],
                                               *(("in", f) for f in forged),
                                               *view.messages[at:]])


@settings(max_examples=60, deadline=None)
@given(dealer=st.integers(0, 4), where=st.sampled_from(["before", "after"]),
       copies=st.integers(1, 2), data=st.data())
def test_a_forged_share_message_never_hides_an_exposed_update(dealer, where, copies,
                                                              data) -> None:
    """Property: in the exposing view of the hidden-peers test (node 0's update alone is
    isolable), one or two extra share messages naming any node, with any of their
    fields replaced by anything and recorded before or after its real one, leave the
    finding standing: node 0's update is EXPOSED, and the audit names the node's
    several share messages. The recording keeps a refused message too; the audit used
    to keep the last message per node only, and one logged after the real one made
    that node's honest shares look wrong, its secrets unknown and the view pass."""
    base = _hidden_peers_view()
    (real,) = _share_messages(base)[dealer]
    forged = [_forged_share_keys(real, data) for _ in range(copies)]
    distinct = {real.to_bytes(), *(f.to_bytes() for f in forged)}
    if len(distinct) == 1:
        return  # nothing forged: the very message the view holds
    report = audit_views([_insert_share_keys(base, forged, where, data)])
    knowledge = report.checks[0]
    assert knowledge.name == CHECKS[0] and knowledge.status == "FAIL", knowledge.detail
    assert [0] in knowledge.statistics[0]["isolable_sums"]
    assert "EXPOSED: the server can isolate the update(s) of node 0" in knowledge.detail
    assert report.verdict == "FAIL"
    line = (f"round 1: node {dealer} has {len(distinct)} share messages in the view; the "
            "audit counts what any of them opens")
    assert report.several_share_messages == [line]
    assert line in knowledge.detail
    assert report.to_plain()["several_share_messages"] == [line]


@pytest.mark.parametrize("dealer", [0, 1, 2])
def test_a_share_message_forged_after_the_real_one_is_named_and_the_update_exposed(
        dealer, tmp_path, capsys) -> None:
    """The case that passed before: a forged share message of the victim (its seed) or
    of a dropped node whose key exposes it, recorded after the real one. The CLI
    exits 1, and the CLI line, the JSON and the markdown name the two messages."""
    from bract.secagg.crypto import x25519_public as public_of

    base = _hidden_peers_view()
    (real,) = _share_messages(base)[dealer]
    forged = dataclasses.replace(real, mask_public=public_of(bytes(31) + b"\x09"),
                                 seed_commitment=bytes(32), signature=bytes(64))
    view = _insert_share_keys(base, [forged], "after")
    report = audit_views([view])
    assert report.checks[0].status == "FAIL"
    assert report.checks[0].statistics[0]["isolable_sums"] == [[0]]
    write_view(view, tmp_path / "v")
    assert main(["audit", "secagg", "--view", str(tmp_path / "v"),
                 "--out", str(tmp_path / "o")]) == 1
    out = " ".join(capsys.readouterr().out.split())
    line = (f"round 1: node {dealer} has 2 share messages in the view; the audit counts "
            "what any of them opens")
    assert f"several share messages: {line}" in out and "verdict: FAIL" in out
    data = json.loads((tmp_path / "o" / "secagg_audit.json").read_text())
    assert data["verdict"] == "FAIL" and data["several_share_messages"] == [line]
    assert line in (tmp_path / "o" / "secagg_audit.md").read_text()


def _round_with_a_forger(forger: int, victim: int, before: bool):
    """A real round recorded by an honest :class:`RecordingServerSession` (n = 6, c = 1,
    t = 4; node 5 drops after sharing) in which hospital ``forger`` sends a share
    message naming ``victim`` (a fresh round key, random commitments, ciphertexts of
    the right size, signed with the forger's own key), ``before`` or after the
    victim's real one. The server refuses it (a signature that does not verify, or a
    second message) and completes the round. Returns the view, the round's result,
    the forged message and the roster."""
    import os

    from bract.secagg.crypto import x25519_public as public_of
    from bract.secagg.errors import SecAggError
    from bract.secagg.merkle import merkle_root
    from bract.secagg.messages import ShareKeys
    from bract.secagg.protocol import (
        _config_digest,
        share_ciphertext_bytes,
        share_statement,
    )

    n, dim, fed = 6, 200, "fed-forge"
    keys, roster, server, clients, inputs = _keyed_round(fed, n, dim, forger * 7 + victim)
    cfg = server.start_round(1, range(n), dim)
    real = {v: clients[v].handle_round_config(cfg) for v in range(n)}
    holders = list(real[victim].holders)
    mask_public, seed_c = public_of(os.urandom(32)), os.urandom(32)
    commits = [os.urandom(32) for _ in range(2 * len(holders))]
    seed_cs, key_cs = b"".join(commits[::2]), b"".join(commits[1::2])
    root = merkle_root([seed_cs[32 * i:32 * i + 32] + key_cs[32 * i:32 * i + 32]
                        for i in range(len(holders))])
    forged = ShareKeys(fed, 1, victim, mask_public, seed_c, holders, seed_cs, key_cs,
                       [b"" if h == victim else os.urandom(share_ciphertext_bytes(
                           fed, 1, victim, h)) for h in holders],
                       keys[forger].sign(share_statement(fed, 1, _config_digest(cfg), victim,
                                                         holders, mask_public, seed_c, root)))
    assert forged.commitment_root() == root
    order = [(victim, forged)] if before else []
    order += [(v, real[v]) for v in range(n)]
    order += [] if before else [(victim, forged)]
    refused = []
    for _, msg in order:
        try:
            server.receive_shares(msg)
        except SecAggError as exc:
            refused.append((msg, exc))
    assert [m for m, _ in refused] == [forged], refused
    dropped = 5
    ureq = _mask_and_sign(server, clients, inputs, dropped)
    for v in ureq.signers:
        server.receive_unmask_reply(clients[v].handle_unmask_request(ureq))
    res = server.finish()
    assert res.dropped == (dropped,) and not res.excluded
    view = ServerView(1, list(server.log), res.weighted_sum, res.total_weight, inputs)
    return view, res, forged, roster


@settings(max_examples=12, deadline=None)
@given(forger=st.integers(0, 5), victim=st.integers(0, 5), before=st.booleans())
def test_an_honest_run_with_a_refused_forged_share_message_reports_the_real_knowledge(
        forger, victim, before) -> None:
    """Property: in a real recorded round where any hospital sends a share message
    naming any other node (its own fresh round key and commitments, signed with its own
    key), before or after that node's real one, and the server refuses it, the audit
    reports exactly the sums the server really isolates (the alive clients' sum: the
    knowledge of the view without the refused message). Without a roster it names the
    two messages and cannot say which masks the server removed (the three checks that
    remove them are skipped: INCOMPLETE, never a pass); with the federation's roster it
    sets the forged one aside, names it, and passes. The audit used to take the last
    message: a forgery after the real one made the victim's secrets look unknown (a
    wrong knowledge, or a survivor "without a seed": exit 2)."""
    if forger == victim:
        victim = (victim + 1) % 6
    view, res, forged, roster = _round_with_a_forger(forger, victim, before)
    honest = dataclasses.replace(view, messages=[(d, m) for d, m in view.messages
                                                 if m is not forged])
    truth = audit_views([honest])
    assert truth.passed, [c.detail for c in truth.checks if not c.passed]
    real_sums = truth.checks[0].statistics[0]["isolable_sums"]
    assert real_sums == [sorted(res.alive)]

    report = audit_views([view])
    knowledge = report.checks[0]
    assert knowledge.status == "pass", knowledge.detail
    assert knowledge.statistics[0]["isolable_sums"] == real_sums
    assert knowledge.statistics[0]["keys_reconstructed"] == 1
    assert report.several_share_messages == [
        f"round 1: node {victim} has 2 share messages in the view; the audit counts what "
        "any of them opens"]
    assert report.wrong_shares == []
    assert _status(report) == {(1, "knowledge-across-rounds"): "pass",
                               (1, "masked-inputs-uniform"): "pass",
                               (1, "survivors-hidden"): "skipped",
                               (1, "dropped-late-hidden"): "skipped",
                               (1, "aggregate-exact"): "skipped"}
    assert report.verdict == "INCOMPLETE"
    assert f"several share messages of node {victim} (2)" in report.checks[2].detail

    signed = audit_views([view], roster=roster)
    assert signed.passed, [c.detail for c in signed.checks if not c.passed]
    assert signed.checks[0].statistics[0]["isolable_sums"] == real_sums
    assert signed.several_share_messages == []
    assert signed.set_aside_share_messages == [
        f"round 1: 1 share message for node {victim} whose signature does not verify "
        "against the roster, set aside (the server refuses such a message)"]


@functools.cache
def _forged_round() -> tuple[ServerView, dict[int, bytes]]:
    view, _, _, roster = _round_with_a_forger(1, 3, before=False)
    return view, roster


def _roster_file(path: Path, roster: dict[int, bytes], federation: str) -> Path:
    from bract.records.roster import Roster, write_roster

    write_roster(path, Roster(federation, dict(roster), {i: f"h{i}" for i in roster}))
    return path


def test_the_cli_audits_a_run_with_a_refused_forgery_incomplete_and_with_the_roster_pass(
        tmp_path, capsys) -> None:
    view, _, _, roster = _round_with_a_forger(2, 5, before=False)
    write_view(view, tmp_path / "v" / "round-1")
    args = ["audit", "secagg", "--view", str(tmp_path / "v"), "--out", str(tmp_path / "o")]
    assert main(args) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "verdict: INCOMPLETE" in out
    assert ("several share messages: round 1: node 5 has 2 share messages in the view; the "
            "audit counts what any of them opens") in out
    assert main([*args, "--roster", str(_roster_file(tmp_path / "r.json", roster,
                                                     "fed-forge"))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "verdict: pass" in out
    assert "set aside: round 1: 1 share message for node 5 whose signature" in out
    data = json.loads((tmp_path / "o" / "secagg_audit.json").read_text())
    assert data["passed"] and len(data["set_aside_share_messages"]) == 1
    assert "set aside by the roster check" in (tmp_path / "o" / "secagg_audit.md").read_text()


def test_a_roster_of_another_federation_or_that_verifies_nothing_is_one_line_exit_2(
        tmp_path, capsys) -> None:
    view, _, _, roster = _round_with_a_forger(2, 5, before=True)
    write_view(view, tmp_path / "v")
    args = ["audit", "secagg", "--view", str(tmp_path / "v"), "--out", str(tmp_path / "o")]
    other = {i: SigningKey.generate().public_bytes() for i in roster}
    cases = [(_roster_file(tmp_path / "a.json", roster, "fed-other"),
              "is the roster of federation 'fed-other'"),
             (_roster_file(tmp_path / "b.json", other, "fed-forge"),
              "none of round 1's 7 share messages verifies against the roster"),
             (tmp_path / "missing.json", "missing.json")]
    (tmp_path / "c.json").write_text("{not json")
    cases.append((tmp_path / "c.json", "malformed roster"))
    for path, match in cases:
        assert main([*args, "--roster", str(path)]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert "error:" in out and match in out and "Traceback" not in out
    assert main(["audit", "secagg", "--roster", str(tmp_path / "a.json"), "--dim", "500",
                 "--out", str(tmp_path / "p")]) == 2
    assert "--roster checks a recorded view" in capsys.readouterr().out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_duplicate_or_forged_share_messages_never_raise_a_traceback(data) -> None:
    """Property: a recorded view (a completed round with a dropout, or one with a
    refused forgery, audited with or without its roster) with any number of extra
    share messages recorded anywhere, each a copy of a real one or one with any fields
    replaced, naming any node (a participant or not), is audited by the CLI to a
    verdict (exit 0 or 1) or refused in one ``error:`` line (exit 2), never a
    traceback; without a roster a node with several distinct messages is named and
    the view does not pass."""
    import contextlib
    import io
    import tempfile

    which = data.draw(st.sampled_from(["dropout", "forged", "forged+roster"]), label="base")
    base, roster = (_dropout_view(), None) if which == "dropout" else _forged_round()
    shares = {u: m[0] for u, m in _share_messages(base).items()}
    messages = list(base.messages)
    for _ in range(data.draw(st.integers(1, 4), label="extra messages")):
        real = shares[data.draw(st.sampled_from(sorted(shares)), label="copied from")]
        msg = (real if data.draw(st.booleans(), label="exact copy")
               else _forged_share_keys(real, data))
        node = data.draw(st.one_of(st.just(real.node_id), st.integers(0, 9)), label="names")
        msg = dataclasses.replace(msg, node_id=node)
        messages.insert(data.draw(st.integers(0, len(messages)), label="at"), ("in", msg))
    view = dataclasses.replace(base, messages=messages)
    several = {u: len(m) for u, m in _share_messages(view).items() if len(m) > 1}
    with tempfile.TemporaryDirectory() as tmp:
        write_view(view, Path(tmp) / "v")
        extra = []
        if which == "forged+roster":
            extra = ["--roster", str(_roster_file(Path(tmp) / "r.json", roster, "fed-forge"))]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(["audit", "secagg", "--view", str(Path(tmp) / "v"),
                         "--out", str(Path(tmp) / "o"), *extra])
        text = " ".join(out.getvalue().split())
    assert code in (0, 1, 2), text
    assert "Traceback" not in text
    if code == 2:
        assert "error:" in text
    elif not extra:
        for u, n in several.items():
            assert f"node {u} has {n} share messages" in text
        assert code == 1 or not several  # several messages: never a plain pass
