"""Per-stage protocol cost of bract's secure aggregation, client and server, at small d.

Run:  .venv/bin/python benchmarks/secagg_stages_bench.py
      .venv/bin/python benchmarks/ab.py --before REV --same-script -- \
          benchmarks/secagg_stages_bench.py          (the same script on two revisions)

With d = 1000 the masking itself is negligible, so what is timed is the protocol:
key agreement, Shamir splitting and reconstruction, signatures, commitments, AES-GCM,
checks. One complete-graph round with the default policy, no dropouts, for n = 10 and
n = 50 clients (``time.perf_counter``; the best of 3 rounds per figure):

* ``client_stage{1,2,3,4}_ms``: one client's ``handle_round_config``,
  ``handle_mask_request``, ``handle_consistency_request``, ``handle_unmask_request``
  (mean over the clients of the round);
* ``server_stage{1,2,3,4}_ms``: the server's calls of each stage summed over all clients
  (``start_round`` + ``receive_shares``; ``mask_requests`` + ``receive_masked_input``;
  ``consistency_request`` + ``receive_consistency_signature``; ``unmask_request`` +
  ``receive_unmask_reply`` + ``finish``);
* ``bytes_*``: canonical message sizes (share message of one client, one mask request,
  one unmask reply).

Only the public API common to every protocol revision is used (no origin, default
policy), so ``benchmarks/ab.py --same-script`` can run it on an older revision.
The last line is one JSON object.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time

import numpy as np

from bract.secagg.crypto import SigningKey
from bract.secagg.encoding import EncodingConfig
from bract.secagg.protocol import ClientSession, ServerSession

D = 1000
#: What every client's update was computed from (the digest each signs, protocol v3).
MODEL = hashlib.sha256(b"secagg_stages_bench: one global model").digest()


def one_round(n: int, rnd: int, server, clients) -> dict[str, float]:
    x = np.linspace(-0.5, 0.5, D, dtype=np.float32)
    c = dict.fromkeys(range(1, 5), 0.0)
    s = dict.fromkeys(range(1, 5), 0.0)
    size: dict[str, int] = {}

    def tc(stage, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        c[stage] += time.perf_counter() - t
        return out

    def ts(stage, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        s[stage] += time.perf_counter() - t
        return out

    cfg = ts(1, server.start_round, rnd, list(range(n)), D)
    server.expect_input_digest(MODEL)
    for v in range(n):
        msg = tc(1, clients[v].handle_round_config, cfg)
        size["bytes_share_message"] = len(msg.to_bytes())
        ts(1, server.receive_shares, msg)
    reqs = ts(2, server.mask_requests)
    size["bytes_mask_request"] = len(reqs[0].to_bytes())
    for v, req in reqs.items():
        mask = functools.partial(clients[v].handle_mask_request, input_digest=MODEL)
        ts(2, server.receive_masked_input, tc(2, mask, req, x, 10))
    creq = ts(3, server.consistency_request)
    for v in creq.alive:
        ts(3, server.receive_consistency_signature,
           tc(3, clients[v].handle_consistency_request, creq))
    ureq = ts(4, server.unmask_request)
    for v in ureq.signers:
        reply = tc(4, clients[v].handle_unmask_request, ureq)
        size["bytes_unmask_reply"] = len(reply.to_bytes())
        ts(4, server.receive_unmask_reply, reply)
    ts(4, server.finish)
    out = {f"client_stage{k}_ms": 1e3 * v / n for k, v in c.items()}
    out.update({f"server_stage{k}_ms": 1e3 * v for k, v in s.items()})
    out.update(size)
    return out


def bench(n: int) -> dict[str, float]:
    keys = {i: SigningKey.generate() for i in range(n)}
    roster = {i: k.public_bytes() for i, k in keys.items()}
    enc = EncodingConfig(clip=1.0, frac_bits=16, max_weight=1000)
    server = ServerSession("stages-bench", roster, encoding=enc)
    clients = {i: ClientSession(i, "stages-bench", keys[i], roster) for i in range(n)}
    for c in clients.values():
        server.receive_advertisement(c.advertise_keys())
    runs = [one_round(n, r, server, clients) for r in range(1, 4)]
    return {k: min(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    out = {}
    for n in (10, 50):
        res = bench(n)
        print(f"n={n}: " + ", ".join(f"{k} {v:.3g}" for k, v in res.items()), flush=True)
        out[f"n{n}"] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
