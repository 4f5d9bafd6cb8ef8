"""A gateway installs only what a gateway needs: the base install sends events and reads caps.

A fresh virtualenv gets ``pip install <this checkout>`` without extras (no faust, no chDB, no
pyarrow, no plotly); there a gateway's script validates and sends an event through
``UsageProducer`` to the real broker, and ``CapGuard`` reads a decision from an enforcement
record published as the worker publishes it. A command that needs an extra says which.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import venv
from pathlib import Path
from typing import Any

import pytest

from spendstream.kafka_admin import ensure_topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["faust", "aiokafka", "chdb", "clickhouse_connect", "pyarrow", "plotly", "litellm"]


@pytest.fixture(scope="module")
def base_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("base-venv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return python


GATEWAY = textwrap.dedent(
    """
    import json, sys, time
    from datetime import datetime, timezone
    from producers import CapGuard, UsageProducer
    from spendstream.settings import load_settings

    settings = load_settings()
    with UsageProducer(settings) as producer:
        producer.send({
            "event_id": "base-install-1",
            "occurred_at": datetime.now(timezone.utc).isoformat(),
            "org_id": "org-1", "user_id": "user-base", "gateway": "base",
            "requested_model": "gpt-4o", "input_tokens": 10,
        })
    # the enforcement record the test published as the worker would
    guard = CapGuard(settings).start(wait_s=60)
    deadline = time.monotonic() + 60
    while guard.check("user-blocked").action != "block" and time.monotonic() < deadline:
        time.sleep(0.05)
    decision = guard.check("user-blocked")
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))
    print(json.dumps({"action": decision.action, "reason": decision.reason, "heavy": heavy}))
    guard.close()
    """
)


def test_the_base_install_sends_an_event_and_reads_a_decision(
    base_python: Path, make_settings: Any
) -> None:
    from confluent_kafka import Consumer, Producer

    settings = make_settings()
    ensure_topics(settings)
    record = {
        "user_id": "user-blocked",
        "org_id": "org-1",
        "plan_id": "free",
        "state": "blocked",
        "reason": "cap",
        "window": "daily",
        "window_id": "daily|2026-12-04",
        "unit": "requests",
        "until": None,
        "downgrade_to": None,
        "usage": "50",
        "limit": "50",
        "remaining": "0",
        "version": 1,
        "as_of": "2026-12-04T10:00:00Z",
    }
    producer = Producer(settings.kafka.confluent_config())
    producer.produce(settings.topics.enforcement, json.dumps(record).encode(), b"user-blocked")
    assert producer.flush(30) == 0

    run = subprocess.run(
        [str(base_python), "-c", GATEWAY, ",".join(HEAVY)],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",  # never this checkout's packages: the installed ones
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"action": "block", "reason": "cap", "heavy": []}, result

    consumer = Consumer(
        {**settings.kafka.confluent_config(), "group.id": "base", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([settings.topics.events])
    try:
        message = None
        for _ in range(60):
            message = consumer.poll(1.0)
            if message is not None and not message.error():
                break
        assert message is not None and json.loads(message.value())["event_id"] == "base-install-1"
    finally:
        consumer.close()


def test_a_command_that_needs_an_extra_says_which(base_python: Path) -> None:
    cli = base_python.parent / "spendstream"
    run = subprocess.run(
        [str(cli), "query", "SELECT 1"], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "pip install 'spendstream[sink]'" in run.stderr
    assert "Traceback" not in run.stderr
    help_run = subprocess.run([str(cli), "--help"], capture_output=True, text=True, cwd="/")
    assert help_run.returncode == 0 and "worker" in help_run.stdout
