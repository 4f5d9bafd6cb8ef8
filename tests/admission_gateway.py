"""One gateway replica for the admission tests: concurrent calls, each admitted first.

Run as a child process (``python tests/admission_gateway.py ...``) with the test's settings in
``SPENDSTREAM_*`` variables. It waits for ``--go`` (a file) to appear, so that every replica
starts its burst at the same moment, then fires ``--calls`` concurrent admissions for one user
(started over ``--spread`` seconds).
Each admitted call "runs" (a short sleep) and sends its usage event carrying the reservation id,
with token counts at most the estimate's (so its cost is at most what was reserved). It prints
one JSON line per call: the reservation id, the decision, the event id (admitted calls only),
and whether it was decided locally.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import orjson

from producers import Admitter, UsageProducer
from spendstream.bench.admission import burst_call
from spendstream.settings import Settings


async def _call(
    admitter: Admitter,
    producer: UsageProducer,
    user: str,
    org: str,
    rng: random.Random,
    spread_s: float,
) -> dict[str, object]:
    if spread_s:
        await asyncio.sleep(rng.uniform(0, spread_s))  # calls arriving over a while
    return await burst_call(admitter, producer, user, org, rng)


async def _main(args: argparse.Namespace) -> None:
    settings = Settings()
    rng = random.Random(args.seed)
    producer = UsageProducer(settings)
    async with Admitter(settings, gateway=args.gateway) as admitter:
        go = Path(args.go)
        print(orjson.dumps({"ready": True}).decode(), flush=True)
        while not go.exists():
            await asyncio.sleep(0.01)
        lines = await asyncio.gather(
            *(
                _call(admitter, producer, args.user, args.org, rng, args.spread)
                for _ in range(args.calls)
            )
        )
    producer.flush(30)
    producer.close()
    for line in lines:
        print(orjson.dumps(line).decode(), flush=True)
    print(
        orjson.dumps(
            {"done": True, "resent": admitter.resent, "local": admitter.local_decisions}
        ).decode(),
        flush=True,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--user", required=True)
    parser.add_argument("--org", required=True)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--go", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spread", type=float, default=0.0, help="seconds the calls start over")
    started = time.monotonic()
    asyncio.run(_main(parser.parse_args()))
    sys.exit(0)
