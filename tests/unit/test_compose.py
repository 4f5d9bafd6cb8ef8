"""deploy/docker-compose.yml cannot run here (no Docker): parse it and check its wiring."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from spendstream.analytics.grafana import DATASOURCE_UID, render_dashboards
from spendstream.settings import Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _spendstream_env() -> dict[str, dict[str, str]]:
    out = {}
    for name, service in _compose()["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        ours = {
            k: _DEFAULT.sub(r"\1", str(v)) for k, v in env.items() if k.startswith("SPENDSTREAM_")
        }
        if ours:
            out[name] = ours
    return out


def _is_setting(variable: str) -> bool:
    """True when ``SPENDSTREAM_A__B`` names a leaf field of :class:`Settings`."""
    model: type[BaseModel] = Settings
    parts = variable.removeprefix("SPENDSTREAM_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if i == len(parts) - 1:
            return not nested
        if not nested:
            return False
        assert isinstance(annotation, type)
        model = annotation
    return False


def test_is_setting_can_say_no() -> None:
    assert _is_setting("SPENDSTREAM_KAFKA__BOOTSTRAP_SERVERS")
    assert not _is_setting("SPENDSTREAM_KAFKA__BOOTSTRAP")
    assert not _is_setting("SPENDSTREAM_KAFKA")  # a group, not a value
    assert not _is_setting("SPENDSTREAM_CLICKHOUSE_URL")  # single underscore


def test_every_spendstream_variable_is_a_real_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    envs = _spendstream_env()
    assert {"worker", "sink", "init"} <= set(envs)
    for service, env in envs.items():
        unknown = [k for k in env if not _is_setting(k)]
        assert not unknown, f"{service}: not settings: {unknown}"
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = load_settings()  # the values validate too
        assert settings.clickhouse.url == "http://clickhouse:8123"
        assert settings.kafka.bootstrap_servers == "kafka:9092"
        for key in env:
            monkeypatch.delenv(key)


def test_services_and_grafana_wiring() -> None:
    services = _compose()["services"]
    assert {"kafka", "clickhouse", "grafana", "worker", "sink"} <= set(services)
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    grafana = services["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    for volume in grafana["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / source).is_dir(), source
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/clickhouse.yaml").read_text()
    )["datasources"][0]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "grafana-clickhouse-datasource"


def test_dashboards_on_disk_are_generated() -> None:
    """deploy/grafana/dashboards is the output of `spendstream analytics grafana`."""
    folder = DEPLOY / "grafana" / "dashboards"
    expected = render_dashboards()
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(expected)
    for name, text in expected.items():
        assert (folder / name).read_text() == text, f"{name} is stale: regenerate it"


# -- the Grafana datasource's ClickHouse user ---------------------------------------------------


def _datasource() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/clickhouse.yaml").read_text())
    source = data["datasources"][0]
    assert isinstance(source, dict)
    return source


def _clickhouse_file(target_folder: str) -> tuple[Path, str]:
    """The one file the clickhouse service mounts into ``target_folder`` (host path, target)."""
    mounts = [
        volume.split(":")
        for volume in _compose()["services"]["clickhouse"]["volumes"]
        if volume.startswith("./") and volume.split(":")[1].startswith(target_folder)
    ]
    assert len(mounts) == 1, mounts
    source, target, *mode = mounts[0]
    assert mode == ["ro"], f"{source} is mounted writable"
    return DEPLOY / source, target


def test_grafana_logs_in_as_a_read_only_user_that_exists() -> None:
    user = _datasource()["jsonData"]["username"]
    assert user and user != "default", "Grafana must not use the admin user"
    path, _ = _clickhouse_file("/etc/clickhouse-server/users.d/")
    root = ET.parse(path).getroot()
    entry = root.find(f"users/{user}")
    assert entry is not None, f"{path.name} defines no user {user!r}"

    profile = root.find(f"profiles/{entry.findtext('profile')}")
    assert profile is not None
    assert profile.findtext("readonly") in ("1", "2")
    if profile.findtext("readonly") == "1":
        # The plugin's client sets max_execution_time on every query.
        assert profile.find("constraints/max_execution_time/changeable_in_readonly") is not None
    assert entry.findtext("access_management", "0") == "0"

    grants = [q.text or "" for q in entry.findall("grants/query")]
    database = _datasource()["jsonData"]["defaultDatabase"]
    assert grants == [f"GRANT SELECT ON {database}.*"]
    env = _spendstream_env()["sink"]
    assert env["SPENDSTREAM_CLICKHOUSE__DATABASE"] == database


def test_grafana_password_comes_from_the_environment() -> None:
    path, _ = _clickhouse_file("/etc/clickhouse-server/users.d/")
    user = _datasource()["jsonData"]["username"]
    password = ET.parse(path).getroot().find(f"users/{user}/password")
    assert password is not None and not (password.text or "").strip(), "no password in the file"
    variable = password.get("from_env")
    assert variable, "the password is read from an environment variable"
    assert _datasource()["secureJsonData"]["password"] == "${" + variable + "}"
    services = _compose()["services"]
    for name in ("clickhouse", "grafana"):
        assert variable in services[name]["environment"], f"{name} lacks {variable}"
    # Grafana gets only its own password, never the admin one.
    assert "CLICKHOUSE_PASSWORD" not in services["grafana"]["environment"]
    for key, value in services["grafana"]["environment"].items():
        assert not re.search(r"\$\{?CLICKHOUSE_PASSWORD\b", str(value)), key


def test_clickhouse_server_config_files_parse() -> None:
    for folder in ("/etc/clickhouse-server/users.d/", "/etc/clickhouse-server/config.d/"):
        path, target = _clickhouse_file(folder)
        assert path.is_file(), path
        assert target.endswith(".xml") and path.suffix == ".xml"
        assert ET.parse(path).getroot().tag == "clickhouse"
    path, _ = _clickhouse_file("/etc/clickhouse-server/config.d/")
    flag = (
        ET.parse(path)
        .getroot()
        .findtext("access_control_improvements/settings_constraints_replace_previous")
    )
    assert flag == "true"  # changeable_in_readonly needs it
