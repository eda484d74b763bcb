"""Secure-aggregation audit: real rounds pass; broken masking and tampered views fail."""

from __future__ import annotations

import dataclasses
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
from bract.secagg.crypto import KeystreamAccumulator, SigningKey, keystream, x25519_shared
from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.encoding import EncodingConfig, encode
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
    return {u: m.mask_public for u, m in view.shares.items()}


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
    seeds, _ = sa._points([m for d, m in r1.messages if m.kind == "secagg.unmask_reply"])
    _, keys = sa._points([m for d, m in r2.messages if m.kind == "secagg.unmask_reply"])
    seed = shamir.reconstruct(seeds[2], t).to_bytes(32, "big")
    s_sk = shamir.reconstruct(keys[2], t).to_bytes(32, "big")
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
    view = ServerView(1, list(server.log), np.zeros(100), 0, inputs, aborted=True)
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
