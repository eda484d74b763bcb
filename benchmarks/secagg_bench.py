"""Benchmark of bract's secure aggregation, side by side with plain summation and
with Flower 1.41's SecAgg+ primitives (``pseudo_rand_gen`` and Shamir).

Run:  .venv/bin/python benchmarks/secagg_bench.py            (about 3-4 minutes, 2 cores)
      .venv/bin/python benchmarks/secagg_bench.py --quick    (smaller sizes, a smoke run)

What is timed (wall clock, ``time.perf_counter``, best of a few repeats where noted):

1. client masking, d = 1e6 float32, k = 9 neighbours (10 keystreams: self + 9 pairs):
   bract's masking kernel (HKDF key derivation + AES-CTR keystreams added into the
   uint64 ring vector) against the raw AES-256-CTR keystream time for the same number
   of bytes in the same run (the limit), Flower's ``pseudo_rand_gen`` masking, and the
   whole client stage 2 (decrypt shares + encode + mask) through ``ClientSession``.
2. server unmasking, n = 100, d = 1e6, 10 % of clients drop after sharing keys
   (before sending their masked input): ``ServerSession.finish()`` only (Shamir
   reconstruction of the seeds and dropped keys, mask removal, decoding); masked inputs
   were already summed as they arrived. SecAgg+ graph (default degree) and complete
   graph. Plain summation of the same vectors and Flower-primitive estimates beside it.
   The SecAgg+ graph declares c = 2 colluders (:data:`HARARY_COLLUDERS`); the complete
   graph the default floor((n - 1) / 3).
3. n = 1000 clients on the SecAgg+ graph, d = 1e5, 10 % dropouts: the sum of the time
   spent inside every ``ServerSession`` method of the round (clients' work is simulated
   in the same process and not counted).
4. server peak memory for n = 100, d = 1e6 (tracemalloc, which also tracks numpy
   buffers), from the first masked input delivered to the decoded result; the masked
   inputs were produced beforehand by the simulated clients and each is released once
   delivered.
5. the graph ``auto`` picks (n = 100, d = 1e6): one hospital's stage 1 and stage 2
   client time, medians of 3 rounds, for three declarations (the default, which keeps
   the complete graph; 10 dropouts with the default collusion bound; 10 dropouts with
   c = 5), each as a ratio to the default. ``--only-graph`` runs this section alone.

The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bract.secagg.crypto import KeystreamAccumulator, SigningKey, hkdf
from bract.secagg.driver import SHARED_INPUT_DIGEST
from bract.secagg.encoding import EncodingConfig, encode
from bract.secagg.protocol import ClientPolicy, ClientSession, ServerSession, round_parameters

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def best(fn: Callable[[], Any], repeat: int = 3) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- federation helpers


#: Colluders declared on the SecAgg+ graph: a degree-k Harary graph cannot honour the
#: default floor((n - 1) / 3), so the sparse rounds declare c = 2 (t = 9 of the 15 in
#: a neighbourhood at n = 100, 12 of 21 at n = 1000).
HARARY_COLLUDERS = 2


def federation(n: int, fed: str, graph: str, enc: EncodingConfig,
               colluders: int | str | None = "default", dropouts: int | None = None):
    keys = {i: SigningKey.generate() for i in range(n)}
    roster = {i: k.public_bytes() for i, k in keys.items()}
    c = colluders if colluders != "default" else (
        HARARY_COLLUDERS if graph == "harary" else None)
    server = ServerSession(fed, roster, encoding=enc, graph=graph, colluders=c,
                           dropouts=dropouts)
    clients = {i: ClientSession(i, fed, keys[i], roster, ClientPolicy(colluders=c))
               for i in range(n)}
    for v, cl in clients.items():
        server.receive_advertisement(cl.advertise_keys(), origin=v)
    return server, clients


class Timer:
    """Accumulates the time spent inside server calls."""

    def __init__(self) -> None:
        self.total = 0.0

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        self.total += time.perf_counter() - t
        return out


def run_round_timed(server, clients, vectors, weights, dim: int, drop: set[int],
                    measure_memory: bool = False) -> dict[str, Any]:
    """Run one round stage by stage; time the server's calls separately."""
    timer = Timer()
    n = len(clients)
    cfg = timer(server.start_round, 1, list(range(n)), dim)
    for c in clients.values():
        timer(server.receive_shares, c.handle_round_config(cfg))
    reqs = timer(server.mask_requests)
    pending = []
    for v, req in reqs.items():
        if v in drop:
            continue
        pending.append(clients[v].handle_mask_request(req, vectors[v % len(vectors)],
                                                      weights[v], input_digest=SHARED_INPUT_DIGEST))
    if measure_memory:
        tracemalloc.start()
        tracemalloc.reset_peak()
    t_sum = time.perf_counter()
    while pending:
        timer(server.receive_masked_input, pending.pop())
    t_sum = time.perf_counter() - t_sum
    creq = timer(server.consistency_request)
    for v in creq.alive:
        timer(server.receive_consistency_signature, clients[v].handle_consistency_request(creq))
    ureq = timer(server.unmask_request)
    for v in ureq.signers:
        timer(server.receive_unmask_reply, clients[v].handle_unmask_request(ureq))
    t = time.perf_counter()
    res = server.finish()
    t_finish = time.perf_counter() - t
    timer.total += t_finish
    peak = None
    if measure_memory:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    alive = list(res.alive)
    ref = np.zeros(dim)
    for v in alive:
        ref += weights[v] * vectors[v % len(vectors)].astype(np.float64)
    err = float(np.max(np.abs(res.weighted_sum - ref)))
    assert err <= res.error_bound, (err, res.error_bound)
    return {"finish": t_finish, "server_total": timer.total, "sum_on_arrival": t_sum,
            "peak": peak, "alive": len(alive), "dropped": len(res.dropped),
            "degree": cfg.degree, "threshold": cfg.threshold, "ring_bits": cfg.ring_bits,
            "max_abs_error": err, "error_bound": res.error_bound}


# ---------------------------------------------------------------- 1. client masking


def bench_client(d: int, k: int, out: dict[str, Any]) -> None:
    enc = EncodingConfig()  # clip 1, f = 16, max weight 2^16
    n = k + 1
    ring = enc.ring_bits_for(n)
    x = (np.arange(d, dtype=np.float32) % 1000) / 1000.0 - 0.5
    y = encode(x, 100, enc, ring)
    keys = [os.urandom(32) for _ in range(k + 1)]
    info = [f"bench/{i}".encode() for i in range(k + 1)]

    def mask() -> None:
        acc = KeystreamAccumulator(y.copy())
        for i, (key, inf) in enumerate(zip(keys, info, strict=True)):
            kk = hkdf(key, inf)
            if i % 2:
                acc.subtract(kk)
            else:
                acc.add(kk)

    copy_only = best(lambda: y.copy())
    nbytes = y.nbytes
    zeros = bytes(nbytes)
    buf = bytearray(nbytes + 16)

    def raw_keystream() -> None:
        for key in keys:
            Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(zeros, buf)

    t_mask = best(mask) - copy_only
    t_limit = best(raw_keystream)
    t_encode = best(lambda: encode(x, 100, enc, ring))
    # ring 2^32 (when the headroom allows it: smaller scale and weights)
    enc32 = EncodingConfig(clip=1.0, frac_bits=12, max_weight=1000)
    y32 = encode(x, 100, enc32, enc32.ring_bits_for(n))
    assert y32.dtype == np.uint32

    def mask32() -> None:
        acc = KeystreamAccumulator(y32.copy())
        for key, inf in zip(keys, info, strict=True):
            acc.add(hkdf(key, inf))

    t_mask32 = best(mask32)

    # Flower 1.41's client masking primitives, same d and k
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    q = [np.asarray(y[:-1].view(np.int64) % (1 << 32))]

    def flower_mask() -> None:
        p = parameters_addition(q, pseudo_rand_gen(keys[0], 1 << 32, [(d,)]))
        for i, key in enumerate(keys[1:]):
            m = pseudo_rand_gen(key, 1 << 32, [(d,)])
            p = parameters_addition(p, m) if i % 2 else parameters_subtraction(p, m)
        parameters_mod(p, 1 << 32)

    t_flower = best(flower_mask, repeat=2)

    # the whole client stage 2 through the real session (decrypt, encode, mask)
    server, clients = federation(n, "bench-client", "complete", enc)
    cfg = server.start_round(1, list(range(n)), d)
    t = time.perf_counter()
    shares0 = clients[0].handle_round_config(cfg)
    t_stage1 = time.perf_counter() - t
    server.receive_shares(shares0)
    for c in list(clients.values())[1:]:
        server.receive_shares(c.handle_round_config(cfg))
    req = server.mask_requests()[0]
    t = time.perf_counter()
    clients[0].handle_mask_request(req, x, 100, input_digest=SHARED_INPUT_DIGEST)
    t_stage = time.perf_counter() - t

    out.update(client_mask_seconds=t_mask, keystream_limit_seconds=t_limit,
               client_mask_over_limit=t_mask / t_limit, client_encode_seconds=t_encode,
               client_stage2_seconds=t_stage, client_stage1_seconds=t_stage1,
               client_mask_seconds_ring32=t_mask32,
               flower_client_mask_seconds=t_flower, client_ring_bits=ring,
               client_neighbours=k, client_dim=d)
    log(f"[client] d={d} k={k} ring=2^{ring}: mask {t_mask:.4f}s, raw AES-CTR keystream for "
        f"the same {(k + 1) * nbytes / 1e6:.0f} MB {t_limit:.4f}s (x{t_mask / t_limit:.2f}); "
        f"ring 2^32 mask {t_mask32:.4f}s; encode {t_encode:.4f}s; whole stage 1 "
        f"{t_stage1:.4f}s; whole stage 2 {t_stage:.4f}s; Flower pseudo_rand_gen masking "
        f"{t_flower:.4f}s; plain: 0")


# ---------------------------------------------------------------- 2 + 4. server n = 100


def bench_server(n: int, d: int, out: dict[str, Any]) -> None:
    enc = EncodingConfig()
    base = [((np.arange(d, dtype=np.float32) * (i + 1)) % 2000) / 2000.0 - 0.5
            for i in range(4)]
    weights = {v: 10 + v for v in range(n)}
    drop = set(range(0, n, 10))  # 10 % drop after sharing keys, before masking
    for graph in ("harary", "complete"):
        server, clients = federation(n, f"bench-{graph}", graph, enc)
        t = time.perf_counter()
        r = run_round_timed(server, clients, base, weights, d, drop,
                            measure_memory=(graph == "harary"))
        log(f"[server n={n} d={d} {graph}] degree {r['degree']} t={r['threshold']} "
            f"ring 2^{r['ring_bits']}: finish() {r['finish']:.3f}s, summing "
            f"{r['alive']} masked inputs on arrival {r['sum_on_arrival']:.3f}s, all server "
            f"calls {r['server_total']:.3f}s (round incl. simulated clients "
            f"{time.perf_counter() - t:.1f}s); max error {r['max_abs_error']:.2e} <= bound "
            f"{r['error_bound']:.2e}")
        key = "" if graph == "harary" else "_complete"
        out[f"server_unmask_seconds{key}"] = r["finish"]
        out[f"server_round_seconds_n{n}{key}"] = r["server_total"]
        out[f"server_sum_on_arrival_seconds{key}"] = r["sum_on_arrival"]
        out[f"server_degree{key}"] = r["degree"]
        if r["peak"] is not None:
            out["server_peak_memory_mb"] = r["peak"] / 2**20
            out["server_vector_mb"] = (d + 1) * r["ring_bits"] / 8 / 2**20
            out["server_all_inputs_mb"] = r["alive"] * (d + 1) * r["ring_bits"] / 8 / 2**20
            log(f"[memory] server peak {r['peak'] / 2**20:.1f} MiB for n={n}, d={d} (one ring "
                f"vector is {out['server_vector_mb']:.1f} MiB; holding all {r['alive']} inputs "
                f"would be {out['server_all_inputs_mb']:.0f} MiB)")
        del server, clients
    # plain summation of the same number of float32 vectors
    vecs = [base[i % 4] for i in range(n - len(drop))]

    def plain() -> None:
        acc = np.zeros(d, np.float64)
        for v in vecs:
            acc += v

    out["plain_sum_seconds"] = best(plain)
    # Flower-primitive estimate of the same unmasking (complete graph, t = n/2 + 1):
    # one Shamir combine per alive seed and per dropped key, one pseudo_rand_gen per mask
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    t_thr = n // 2 + 1
    shares = create_shares(os.urandom(32), t_thr, n)
    t_combine = best(lambda: combine_shares(shares[:t_thr]), repeat=1)
    t_prg = best(lambda: pseudo_rand_gen(os.urandom(32), 1 << 32, [(d,)]), repeat=3)
    alive, dropped = n - len(drop), len(drop)
    est = (alive + dropped) * t_combine + (alive + dropped * alive) * t_prg
    from bract.secagg import shamir

    xs = [shamir.x_coordinate(v) for v in range(n)]
    ys = shamir.split(12345, t_thr, xs)
    pts = list(zip(xs, ys, strict=True))[:t_thr]
    def ours() -> None:
        shamir._lagrange_at_zero.cache_clear()  # time the uncached interpolation
        shamir.reconstruct(pts, t_thr)

    t_ours = best(ours, repeat=3)
    out.update(flower_server_unmask_estimate_seconds=est, flower_shamir_combine_seconds=t_combine,
               bract_shamir_reconstruct_seconds=t_ours, flower_prg_seconds_per_mask=t_prg)
    log(f"[compare n={n} d={d}] plain float sum {out['plain_sum_seconds']:.3f}s; Flower "
        f"primitives (estimate, complete graph): Shamir combine {t_combine:.3f}s each x "
        f"{alive + dropped} + pseudo_rand_gen {t_prg:.4f}s x {alive + dropped * alive} = "
        f"{est:.1f}s; bract Shamir reconstruct (t={t_thr}) {t_ours * 1e3:.2f} ms")


# ---------------------------------------------------------------- 5. the graph auto picks


#: (label, colluders, declared dropouts) of the federations section 5 compares; the
#: first is the default (no tolerance declared: auto keeps the complete graph).
GRAPH_DECLARATIONS = (
    ("default: c = floor((n-1)/3), no dropouts declared", None, None),
    ("c = floor((n-1)/3), 10 dropouts", None, 10),
    ("c = 5, 10 dropouts", 5, 10),
)


def bench_graph_choice(n: int, d: int, rounds: int, out: dict[str, Any]) -> None:
    """One hospital's client work per round on the graph ``auto`` picks for each
    declaration: stage 1 (share its secrets with its neighbours) and stage 2 (check
    their shares, encode, mask with one keystream per neighbour), medians of
    ``rounds`` rounds, and the ratio to the default (complete) graph."""
    enc = EncodingConfig()
    x = (np.arange(d, dtype=np.float32) % 1000) / 1000.0 - 0.5
    base: dict[str, float] = {}
    for label, c, dropouts in GRAPH_DECLARATIONS:
        server, clients = federation(n, "bench-graph", "auto", enc, colluders=c,
                                     dropouts=dropouts)
        s1, s2 = [], []
        for r in range(1, rounds + 1):
            cfg = server.start_round(r, list(range(n)), d)
            t = time.perf_counter()
            server.receive_shares(clients[0].handle_round_config(cfg))
            s1.append(time.perf_counter() - t)
            for v in range(1, n):
                server.receive_shares(clients[v].handle_round_config(cfg))
            req = server.mask_requests()[0]
            t = time.perf_counter()
            clients[0].handle_mask_request(req, x, 100, input_digest=SHARED_INPUT_DIGEST)
            s2.append(time.perf_counter() - t)
            server.abort_round("benchmark: one client timed")
            for cl in clients.values():
                cl.abort_round()
        stage1, stage2 = float(np.median(s1)), float(np.median(s2))
        if not base:
            base = {"stage1": stage1, "stage2": stage2}
        shape = round_parameters(n, "auto", None, c, 2, dropouts)
        tol = shape.tolerated
        key = f"graph_{shape.kind}_{shape.degree}"
        out[key] = {"label": label, "degree": shape.degree, "threshold": shape.threshold,
                    "colluders": shape.colluders, "tolerated": tol,
                    "stage1_seconds": stage1, "stage2_seconds": stage2,
                    "stage2_over_default": stage2 / base["stage2"],
                    "stage1_over_default": stage1 / base["stage1"]}
        log(f"[graph n={n} d={d}] {label}: {shape.kind} degree {shape.degree}, t = "
            f"{shape.threshold}, survives {tol} dropouts; one hospital's stage 1 "
            f"{stage1:.3f}s (x{stage1 / base['stage1']:.2f} of the default), stage 2 "
            f"{stage2:.3f}s (x{stage2 / base['stage2']:.2f})")
        del server, clients


# ---------------------------------------------------------------- 3. n = 1000 sparse


def bench_large(n: int, d: int, out: dict[str, Any]) -> None:
    enc = EncodingConfig()
    base = [((np.arange(d, dtype=np.float32) * (i + 1)) % 2000) / 2000.0 - 0.5
            for i in range(4)]
    weights = {v: 1 + v % 50 for v in range(n)}
    drop = set(range(0, n, 10))
    server, clients = federation(n, "bench-large", "harary", enc)
    t = time.perf_counter()
    r = run_round_timed(server, clients, base, weights, d, drop)
    out.update(server_round_seconds_n1000=r["server_total"], server_finish_seconds_n1000=r[
        "finish"], large_n=n, large_dim=d, large_degree=r["degree"])
    log(f"[server n={n} d={d} harary] degree {r['degree']} t={r['threshold']}: all server "
        f"calls {r['server_total']:.3f}s (of which finish() {r['finish']:.3f}s, summing on "
        f"arrival {r['sum_on_arrival']:.3f}s); whole simulated round "
        f"{time.perf_counter() - t:.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only-graph", action="store_true",
                    help="only section 5 (the graph auto picks)")
    args = ap.parse_args()
    out: dict[str, Any] = {"python": sys.version.split()[0], "machine": platform.machine(),
                           "cpus": os.cpu_count(), "numpy": np.__version__}
    t0 = time.perf_counter()
    if args.only_graph:
        bench_graph_choice(100, 10_000 if args.quick else 1_000_000, 3, out)
    elif args.quick:
        bench_client(10_000, 9, out)
        bench_server(20, 10_000, out)
        bench_large(100, 1_000, out)
        bench_graph_choice(100, 10_000, 2, out)
    else:
        bench_client(1_000_000, 9, out)
        bench_server(100, 1_000_000, out)
        bench_large(1000, 100_000, out)
        bench_graph_choice(100, 1_000_000, 3, out)
    out["total_seconds"] = time.perf_counter() - t0
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}))


if __name__ == "__main__":
    main()
