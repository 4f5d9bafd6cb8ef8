"""Shared fixtures: one real Kafka broker per test session, and isolated settings per test.

The broker is chosen once per session:

1. ``SPENDSTREAM_TEST_KAFKA_BOOTSTRAP`` set: that existing cluster (restart tests skip);
2. a Docker engine answers: a testcontainers ``KafkaContainer`` (restart tests skip);
3. otherwise (this machine, CI): :class:`spendstream.localkafka.LocalKafka` from the Maven jars,
   on free loopback ports with its data in the session's tmp folder.

It starts lazily: only tests that use ``kafka_broker`` (directly or via ``make_settings``) pay
for it. Every test gets its own topic names (``t<hex>.usage.events`` ...), consumer groups and
state folder, so tests never see each other's messages.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from spendstream.settings import Settings, TopicSettings

pytest_plugins = ["litellm_support"]  # the LiteLLM plug-in tests' shared fixture

EXTERNAL_ENV = "SPENDSTREAM_TEST_KAFKA_BOOTSTRAP"
TEST_ENV_PREFIX = "SPENDSTREAM_TEST_"
MARKED_DIRS = ("unit", "functional", "integration", "fault")
TESTS_DIR = Path(__file__).resolve().parent
NO_BROKER = "127.0.0.1:9"  # the discard port: nothing listens, nothing is reached by accident


# -- markers ---------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by the folder it lives in (tests/unit -> ``unit`` ...)."""
    for item in items:
        try:
            rel = Path(str(item.path)).resolve().relative_to(TESTS_DIR)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in MARKED_DIRS:
            item.add_marker(getattr(pytest.mark, rel.parts[0]))


# -- the broker ------------------------------------------------------------------------------


class KafkaBroker(Protocol):
    """What tests get from ``kafka_broker``."""

    kind: str
    bootstrap: str

    def stop(self) -> None:
        """Stop the broker (keeps its data and port)."""

    def start(self) -> None:
        """Start it again on the same port and data; returns once it answers."""


class LocalBroker:
    """A :class:`~spendstream.localkafka.LocalKafka` started for this session."""

    kind = "local"

    def __init__(self, data_dir: Path) -> None:
        from spendstream.localkafka import LocalKafka

        port, controller_port = _free_ports(2)
        self.kafka = LocalKafka(
            port=port, controller_port=controller_port, data_dir=data_dir, start_timeout_s=120
        )
        self.bootstrap = self.kafka.bootstrap

    def start(self) -> None:
        """Start (or restart) the broker on the same port and data folder."""
        self.kafka.up()

    def stop(self) -> None:
        """Stop the broker; its data stays."""
        self.kafka.down()


class ExternalBroker:
    """A cluster this session does not own: it can be used, not restarted."""

    def __init__(self, bootstrap: str, kind: str, container: Any = None) -> None:
        self.bootstrap = bootstrap
        self.kind = kind
        self.container = container

    def start(self) -> None:
        """Restarts are only possible on a broker this session started itself."""
        pytest.skip(f"cannot restart the {self.kind} Kafka broker at {self.bootstrap}")

    def stop(self) -> None:
        """Restarts are only possible on a broker this session started itself."""
        pytest.skip(f"cannot stop the {self.kind} Kafka broker at {self.bootstrap}")


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _docker_answers() -> bool:
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """The session's Kafka broker: ``.bootstrap``, ``.stop()``, ``.start()`` (see module doc)."""
    from spendstream.kafka_admin import wait_for_broker

    external = os.environ.get(EXTERNAL_ENV)
    if external:
        wait_for_broker({"bootstrap.servers": external}, timeout=30)
        yield ExternalBroker(external, "external")
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield ExternalBroker(container.get_bootstrap_server(), "testcontainers", container)
        return
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.kafka.down()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """``host:port`` of the session's broker."""
    return kafka_broker.bootstrap


# -- per-test settings -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ignore the developer's own SPENDSTREAM_* variables: tests configure themselves."""
    for name in list(os.environ):
        if name.startswith("SPENDSTREAM_") and not name.startswith(TEST_ENV_PREFIX):
            monkeypatch.delenv(name)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class SettingsFactory:
    """``make_settings(**overrides) -> Settings`` for one test.

    Every call in a test shares the test's namespace: topics ``<prefix>.<default name>``,
    faust app id and sink group ``<prefix>-...``, state folder under the test's tmp folder.
    Nested overrides merge (``processor={"window_s": 5}`` keeps the other processor fields).
    ``broker=False`` builds settings without starting the session broker (``bootstrap`` then
    points at a closed port).
    """

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.state_dir = tmp_path / "state"
        self._request = request
        self.bootstrap: str | None = None

    def base(self, bootstrap: str) -> dict[str, Any]:
        """The isolated defaults of this test."""
        return {
            "state_dir": self.state_dir,
            "kafka": {"bootstrap_servers": bootstrap},
            "topics": {
                role: f"{self.prefix}.{name}" for role, name in TopicSettings().names().items()
            },
            "processor": {"app_id": f"{self.prefix}-spendstream"},
            "sink": {"group_id": f"{self.prefix}-sink"},
        }

    def __call__(self, *, broker: bool = True, **overrides: Any) -> Settings:
        """Settings pointing at the session broker, isolated to this test, plus ``overrides``."""
        bootstrap = NO_BROKER
        if broker:
            if self.bootstrap is None:
                self.bootstrap = str(self._request.getfixturevalue("kafka_bootstrap"))
            bootstrap = self.bootstrap
        return Settings(**_merge(self.base(bootstrap), overrides))

    def cleanup(self) -> None:
        """Delete this test's topics from the broker (best effort; keeps a long session light)."""
        if self.bootstrap is None:
            return
        from spendstream.errors import KafkaError
        from spendstream.kafka_admin import delete_topics, topic_partitions

        conf = {"bootstrap.servers": self.bootstrap}
        try:
            ours = [t for t in topic_partitions(conf, timeout=5) if t.startswith(self.prefix)]
            delete_topics(conf, ours, timeout=10)
        except KafkaError:
            pass  # a broker stopped by the test itself; the session tmp folder goes anyway


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SettingsFactory]:
    """A :class:`SettingsFactory` for this test; its topics are deleted afterwards."""
    factory = SettingsFactory(request, tmp_path)
    yield factory
    factory.cleanup()


@pytest.fixture
def settings_factory(make_settings: SettingsFactory) -> SettingsFactory:
    """Alias of ``make_settings``."""
    return make_settings


@pytest.fixture
def settings(make_settings: SettingsFactory) -> Settings:
    """This test's settings on the session broker (no topics created)."""
    return make_settings()


@pytest.fixture
def topics(settings: Settings) -> Settings:
    """``settings`` with every topic created (:func:`~spendstream.kafka_admin.ensure_topics`)."""
    from spendstream.kafka_admin import ensure_topics

    ensure_topics(settings)
    return settings


SettingsMaker = Callable[..., Settings]
"""Type of ``make_settings`` for annotations in tests."""
