"""Settings: environment mapping, secret masking, one error listing every problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spendstream.cli import app
from spendstream.errors import ConfigError
from spendstream.settings import Settings, load_settings

SECRETS = {
    "SPENDSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "SPENDSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "SPENDSTREAM_KAFKA__SASL_USERNAME": "metering",
    "SPENDSTREAM_KAFKA__SASL_PASSWORD": "kafka-hunter2",
    "SPENDSTREAM_KAFKA__SSL_CAFILE": "/etc/ssl/ca.pem",
    "SPENDSTREAM_KAFKA__SSL_CERTFILE": "/etc/ssl/client.pem",
    "SPENDSTREAM_KAFKA__SSL_KEYFILE": "/etc/ssl/client.key",
    "SPENDSTREAM_KAFKA__SSL_KEY_PASSWORD": "key-hunter3",
    "SPENDSTREAM_CLICKHOUSE__PASSWORD": "ch-hunter4",
}
SECRET_VALUES = ("kafka-hunter2", "key-hunter3", "ch-hunter4")


def test_env_prefix_and_double_underscore_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "b1:9092,b2:9092")
    monkeypatch.setenv("SPENDSTREAM_KAFKA__LOCAL__PORT", "20000")
    monkeypatch.setenv("SPENDSTREAM_TOPICS__EVENTS", "prod.usage.events")
    monkeypatch.setenv("SPENDSTREAM_TOPICS__PARTITIONS", "12")
    monkeypatch.setenv("SPENDSTREAM_STATE_DIR", "/var/lib/spendstream")
    monkeypatch.setenv("KAFKA__BOOTSTRAP_SERVERS", "ignored:1")  # no prefix: not ours

    s = load_settings()

    assert s.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert s.kafka.local.port == 20000
    assert s.topics.events == "prod.usage.events"
    assert s.topics.names()["events"] == "prod.usage.events"
    assert s.topics.partitions == 12
    assert s.kafka_data_dir == Path("/var/lib/spendstream/kafka")
    assert not s.kafka.is_local_default


def test_defaults_point_at_the_local_broker() -> None:
    s = Settings()
    assert s.kafka.is_local_default
    assert s.kafka.local.controller_port is None  # LocalKafka then uses port + 1
    assert s.topics.compacted() == {s.topics.enforcement, s.topics.subscriptions}


def test_confluent_config_carries_sasl_and_ssl(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)

    conf = load_settings().kafka.confluent_config()

    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "metering"
    assert conf["sasl.password"] == "kafka-hunter2"
    assert conf["ssl.ca.location"] == "/etc/ssl/ca.pem"
    assert conf["ssl.certificate.location"] == "/etc/ssl/client.pem"
    assert conf["ssl.key.location"] == "/etc/ssl/client.key"
    assert conf["ssl.key.password"] == "key-hunter3"


def test_plaintext_confluent_config_has_no_security_extras() -> None:
    conf = Settings().kafka.confluent_config()
    assert conf["security.protocol"] == "PLAINTEXT"
    assert not any(key.startswith(("sasl.", "ssl.")) for key in conf)


def test_masked_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)

    masked = load_settings().masked()

    text = json.dumps(masked)
    assert not any(secret in text for secret in SECRET_VALUES)
    assert masked["kafka"]["sasl_password"] == "**********"
    assert masked["kafka"]["ssl_key_password"] == "**********"
    assert masked["clickhouse"]["password"] == "**********"
    assert masked["kafka"]["sasl_username"] == "metering"  # not a secret


def test_config_show_masks_secrets() -> None:
    result = CliRunner().invoke(app, ["config", "show"], env=SECRETS)

    assert result.exit_code == 0, result.output
    assert not any(secret in result.output for secret in SECRET_VALUES)
    shown = json.loads(result.output)
    assert shown["kafka"]["sasl_password"] == "**********"
    assert shown["kafka"]["security_protocol"] == "SASL_SSL"


def test_bad_settings_exit_2_with_every_problem_in_one_message() -> None:
    env = {
        "SPENDSTREAM_TOPICS__PARTITIONS": "0",
        "SPENDSTREAM_KAFKA__LOCAL__PORT": "80",
        "SPENDSTREAM_LOG_LEVEL": "LOUD",
    }
    result = CliRunner().invoke(app, ["config", "show"], env=env)

    assert result.exit_code == 2
    assert result.output.count("error:") == 1
    assert "3 invalid settings" in result.output
    for name in ("SPENDSTREAM_TOPICS__PARTITIONS", "SPENDSTREAM_KAFKA__LOCAL__PORT"):
        assert name in result.output
    assert "SPENDSTREAM_LOG_LEVEL" in result.output
    assert "Traceback" not in result.output


def test_incomplete_sasl_names_what_is_missing() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(kafka={"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"})
    message = str(info.value)
    assert message.startswith("1 invalid setting:")
    assert "sasl_mechanism" in message
    assert "sasl_password" in message
    assert "sasl_username" not in message.split("needs", 1)[1]


def test_load_settings_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            topics={"partitions": 0, "events": "usage.priced"},
            clickhouse={"url": "ftp://nope"},
            processor={"window_s": 0},
        )
    message = str(info.value)
    assert message.startswith("3 invalid settings:")
    assert "SPENDSTREAM_TOPICS__PARTITIONS" in message
    assert "SPENDSTREAM_CLICKHOUSE__URL" in message
    assert "SPENDSTREAM_PROCESSOR__WINDOW_S" in message
    assert len(message.splitlines()) == 4


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ConfigError, match="SPENDSTREAM_KAFAK"):
        load_settings(kafak={"bootstrap_servers": "x:1"})


def test_the_local_broker_outside_a_checkout_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed wheel has no deploy/kafka: the launcher says what it needs, not a Maven log.
    from spendstream import localkafka
    from spendstream.errors import LocalKafkaError

    monkeypatch.setattr(localkafka, "KAFKA_DEPLOY_DIR", tmp_path / "deploy" / "kafka")
    kafka = localkafka.LocalKafka(data_dir=tmp_path / "data", jars_dir=tmp_path / "jars")
    with pytest.raises(LocalKafkaError, match="runs from a spendstream checkout"):
        kafka.up()
    with pytest.raises(LocalKafkaError, match=r"pom\.xml"):
        kafka.ensure_jars()


def test_settings_reach_a_child_process_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lists, nested models and secret maps travel as JSON with secrets revealed: str() wrote
    # Python reprs with secrets masked, which a child process could not read back.
    from spendstream.settings import load_settings

    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    settings = load_settings(
        notify={
            "endpoints": [{"name": "ops", "url": "https://hooks.example/t?token=s3cret"}],
            "routes": [{"endpoints": ["ops"], "kinds": ["alert"]}],
            "endpoint_secrets": {"ops": secret},
        }
    )
    for name in [n for n in __import__("os").environ if n.startswith("SPENDSTREAM_")]:
        monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    again = load_settings()
    assert (
        again.notify.endpoints[0].url.get_secret_value() == "https://hooks.example/t?token=s3cret"
    )
    assert again.notify.endpoint_secrets["ops"].get_secret_value() == secret
    assert again.notify.routes == settings.notify.routes
