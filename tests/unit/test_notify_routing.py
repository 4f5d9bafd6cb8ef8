"""Notify routing: which endpoints a record goes to, and the start-up checks of the routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spendstream.errors import ConfigError
from spendstream.notify.records import Kind
from spendstream.notify.routing import RouteTable, load_routes
from spendstream.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PLANS = ("free", "pro", "team", "enterprise")


def table(routes: list[dict[str, Any]], names: tuple[str, ...] = ("a", "b", "c")) -> RouteTable:
    settings = Settings(
        notify={
            "endpoints": [{"name": n, "url": f"https://{n}.example.com/hook"} for n in names],
            "routes": routes,
            "signing_secret": SECRET,
        }
    )
    return load_routes(settings, plan_ids=PLANS)


ROUTES: list[dict[str, Any]] = [
    {"kinds": ["enforcement"], "plans": ["team", "enterprise"], "endpoints": ["a"]},
    {"kinds": ["alert", "enforcement"], "endpoints": ["b"]},
    {"kinds": ["break_even"], "plans": ["free", "pro"], "endpoints": ["c"]},
    {"kinds": ["threshold"], "orgs": ["acme"], "endpoints": ["c", "a"]},
]


@pytest.mark.parametrize(
    ("kind", "plan", "org", "expected"),
    [
        ("enforcement", "team", "x", ["a", "b"]),
        ("enforcement", "enterprise", "x", ["a", "b"]),
        ("enforcement", "pro", "x", ["b"]),
        ("threshold", "team", "x", ["b"]),
        ("threshold", "team", "acme", ["a", "b", "c"]),  # each endpoint once, configured order
        ("break_even", "free", "x", ["b", "c"]),
        ("break_even", "pro", "acme", ["b", "c"]),
        ("break_even", "team", "x", ["b"]),
        ("break_even", "(none)", "", ["b"]),
    ],
)
def test_records_go_to_every_endpoint_of_every_matching_route_once(
    kind: Kind, plan: str, org: str, expected: list[str]
) -> None:
    routes = table(ROUTES)
    assert routes.targets(kind, plan, org) == expected


@pytest.mark.parametrize(
    ("routes", "endpoint", "kinds"),
    [
        (ROUTES, "a", {"enforcement", "threshold"}),
        (ROUTES, "b", {"threshold", "break_even", "enforcement"}),
        (ROUTES, "c", {"threshold", "break_even"}),
        ([{"endpoints": ["a", "b", "c"]}], "c", {"threshold", "break_even", "enforcement"}),
    ],
)
def test_an_endpoint_reads_only_the_kinds_routed_to_it(
    routes: list[dict[str, Any]], endpoint: str, kinds: set[str]
) -> None:
    assert table(routes).kinds_for(endpoint) == kinds


def _problems(notify: dict[str, Any], plans: tuple[str, ...] = PLANS) -> str:
    with pytest.raises(ConfigError) as caught:
        load_routes(Settings(notify=notify), plan_ids=plans)
    return str(caught.value)


def _endpoint(name: str) -> dict[str, str]:
    return {"name": name, "url": f"https://{name}.example.com/hook?token=t0ps3cret"}


def _cfg(names: list[str], routes: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"endpoints": [_endpoint(n) for n in names], "routes": routes, **extra}


@pytest.mark.parametrize(
    ("notify", "messages"),
    [
        ({"signing_secret": SECRET}, ["no endpoints"]),
        (
            _cfg(["a", "a"], [{"endpoints": ["a"]}], signing_secret=SECRET),
            ["endpoint 'a' is defined 2 times"],
        ),
        (
            _cfg(["a"], [{"endpoints": ["a", "z"]}], signing_secret=SECRET),
            ["routes[0] names endpoint 'z', which is not defined"],
        ),
        (
            _cfg(["a", "b"], [{"endpoints": ["a"]}], signing_secret=SECRET),
            ["endpoint 'b' is named by no route"],
        ),
        (
            _cfg(["a"], [{"plans": ["gold"], "endpoints": ["a"]}], signing_secret=SECRET),
            ["routes[0] names plan 'gold', which the plans file does not define"],
        ),
        (
            _cfg(["a"], [{"endpoints": ["a"]}]),
            ["endpoint 'a' has no signing secret", "SPENDSTREAM_NOTIFY__ENDPOINT_SECRETS__A"],
        ),
        (
            _cfg(["a"], [{"endpoints": ["a"]}], endpoint_secrets={"a": SECRET, "ab": SECRET}),
            ["endpoint_secrets names 'ab', which is not an endpoint"],
        ),
        (
            _cfg(["a", "b"], [{"plans": ["x"], "endpoints": ["z"]}]),
            ["6 problems", "'z'", "'x'", "'a' is named by no route", "'b' has no signing secret"],
        ),
    ],
)
def test_route_problems_are_all_listed_at_start_up(
    notify: dict[str, Any], messages: list[str]
) -> None:
    text = _problems(notify)
    for message in messages:
        assert message in text, text
    assert "t0ps3cret" not in text and SECRET not in text


@pytest.mark.parametrize(
    ("notify", "error"),
    [
        ({"endpoints": [{"name": "A", "url": "https://x/"}]}, "endpoints.0.name"),
        ({"endpoints": [{"name": "a", "url": "ftp://x/"}]}, "http:// or https://"),
        ({"endpoints": [{"name": "a", "url": "https:///nohost"}]}, "with a host"),
        ({"endpoints": [{"name": "a", "url": "http://x:99999/"}]}, "not a URL"),
        ({"endpoints": [{"name": "a", "url": "http://x/", "color": "red"}]}, "color"),
        ({"routes": [{"kinds": ["alerts"], "endpoints": ["a"]}]}, "routes.0.kinds.0"),
        ({"routes": [{"endpoints": []}]}, "routes.0.endpoints"),
        ({"routes_file": "r.yaml", "routes": [{"endpoints": ["a"]}]}, "not both"),
        ({"retry_initial_s": 10, "retry_max_s": 5}, "must not exceed"),
    ],
)
def test_settings_refuse_malformed_endpoints_and_routes(notify: dict[str, Any], error: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=error):
        Settings(notify=notify)


def test_the_example_routes_file_loads_against_the_sample_plans() -> None:
    example = REPO / "deploy" / "notify-routes.example.yaml"
    settings = Settings(notify={"routes_file": example, "signing_secret": SECRET})
    routes = load_routes(settings)  # the sample plans
    assert list(routes.endpoints) == ["oncall", "billing", "sales"]
    assert routes.targets("enforcement", "team", "o") == ["oncall", "billing"]
    assert routes.targets("break_even", "pro", "o") == ["billing", "sales"]
    assert routes.targets("threshold", "enterprise", "o") == ["billing"]
    assert routes.endpoints["billing"].concurrency == 4
    assert "example.com" not in repr(routes.endpoints["billing"])  # URLs and keys stay out


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        ("endpoints: [\n", ["not valid YAML"]),
        ("- 1\n", ["invalid notify routes", "(top level)"]),
        (
            "endpoints:\n  - {name: a, url: 'https://a/', secret: whsec_x}\nroutes: []\n",
            ["endpoints[0].secret: Extra inputs are not permitted"],
        ),
        ("endpoints: []\n", ["routes: Field required"]),
        (
            "endpoints:\n  - {name: a, url: 'https://a/'}\nroutes:\n  - {endpoints: [b]}\n",
            ["routes[0] names endpoint 'b'", "endpoint 'a' is named by no route"],
        ),
    ],
)
def test_a_bad_routes_file_is_refused_with_where(
    tmp_path: Path, text: str, messages: list[str]
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    got = _problems({"routes_file": path, "signing_secret": SECRET})
    assert str(path) in got
    for message in messages:
        assert message in got, got


def test_a_missing_routes_file_is_named(tmp_path: Path) -> None:
    got = _problems({"routes_file": tmp_path / "nope.yaml", "signing_secret": SECRET})
    assert "cannot read the notify routes file" in got and "nope.yaml" in got
