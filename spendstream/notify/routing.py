"""Which endpoints a notification goes to, from the settings or a routes file.

A route names record kinds (``alert`` = ``threshold`` + ``break_even``, ``enforcement``), plans
and orgs (empty: any) and one or more endpoints; a notification goes to every endpoint of every
route it matches, once. :func:`load_routes` checks everything at start-up and raises one
:class:`~spendstream.errors.ConfigError` that lists every problem: an unreadable or malformed
routes file, an endpoint without a valid secret, a route naming an unknown endpoint or plan, an
endpoint no route names.

The routes file is YAML (see deploy/notify-routes.example.yaml)::

    endpoints:
      - {name: oncall, url: "https://hooks.example.com/spendstream", timeout_s: 10}
    routes:
      - {kinds: [enforcement], plans: [team, enterprise], endpoints: [oncall]}

Secrets never live in it: ``SPENDSTREAM_NOTIFY__SIGNING_SECRET`` (every endpoint) or
``SPENDSTREAM_NOTIFY__ENDPOINT_SECRETS__<NAME>`` (one).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from spendstream.errors import ConfigError
from spendstream.notify.records import KINDS, Kind, Notification
from spendstream.notify.signing import secret_keys
from spendstream.settings import NotifyEndpoint, NotifyRoute, NotifySettings, Settings

_KIND_ALIASES: dict[str, frozenset[Kind]] = {
    "alert": frozenset({"threshold", "break_even"}),
    **{kind: frozenset({kind}) for kind in KINDS},
}


@dataclass(frozen=True)
class Endpoint:
    """An endpoint ready to send to: its URL and HMAC keys revealed (never printed)."""

    name: str
    url: str = field(repr=False)
    keys: tuple[bytes, ...] = field(repr=False)
    timeout_s: float = 15.0
    concurrency: int = 1


@dataclass(frozen=True)
class Route:
    """Records of ``kinds`` whose plan is in ``plans`` and org in ``orgs`` (empty: any)."""

    kinds: frozenset[Kind]
    plans: frozenset[str]
    orgs: frozenset[str]
    endpoints: tuple[str, ...]

    def matches(self, kind: Kind, plan_id: str, org_id: str) -> bool:
        """Whether a record of ``kind`` about a user on ``plan_id`` in ``org_id`` matches."""
        return (
            kind in self.kinds
            and (not self.plans or plan_id in self.plans)
            and (not self.orgs or org_id in self.orgs)
        )

    @classmethod
    def from_settings(cls, route: NotifyRoute) -> Route:
        """Compile a configured route (``alert`` expands to both alert kinds)."""
        kinds: frozenset[Kind] = frozenset().union(*(_KIND_ALIASES[k] for k in route.kinds))
        return cls(kinds, frozenset(route.plans), frozenset(route.orgs), tuple(route.endpoints))


@dataclass(frozen=True)
class RouteTable:
    """The endpoints (in configured order) and the routes to them."""

    endpoints: dict[str, Endpoint]
    routes: tuple[Route, ...]

    def targets(self, kind: Kind, plan_id: str, org_id: str) -> list[str]:
        """Names of the endpoints a record goes to, each once, in configured order."""
        wanted = {
            name
            for route in self.routes
            if route.matches(kind, plan_id, org_id)
            for name in route.endpoints
        }
        return [name for name in self.endpoints if name in wanted]

    def wants(self, endpoint: str, notification: Notification) -> bool:
        """Whether ``notification`` goes to ``endpoint``."""
        n = notification
        return any(
            endpoint in route.endpoints and route.matches(n.kind, n.plan_id, n.org_id)
            for route in self.routes
        )

    def kinds_for(self, endpoint: str) -> frozenset[Kind]:
        """Every kind some route sends to ``endpoint`` (which topics its consumer reads)."""
        return frozenset().union(*(r.kinds for r in self.routes if endpoint in r.endpoints))


class _RoutesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    endpoints: list[NotifyEndpoint]
    routes: list[NotifyRoute]


def read_routes_file(path: Path) -> tuple[list[NotifyEndpoint], list[NotifyRoute]]:
    """The endpoints and routes of a routes file; :class:`ConfigError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        why = exc.strerror or exc
        raise ConfigError(f"cannot read the notify routes file {path}: {why}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        parsed = _RoutesFile.model_validate(data)
    except ValidationError as exc:
        lines = [f"  - {_where(err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)]
        raise ConfigError(f"{path}: invalid notify routes:\n" + "\n".join(lines)) from exc
    return parsed.endpoints, parsed.routes


def _where(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_routes(settings: Settings, *, plan_ids: Collection[str] | None = None) -> RouteTable:
    """The route table of ``settings.notify``, checked; :class:`ConfigError` lists every problem.

    ``plan_ids`` are the plans routes may name (default: those of ``settings.plans_file``, or
    the sample plans).
    """
    cfg = settings.notify
    if cfg.routes_file is not None:
        endpoints, routes = read_routes_file(cfg.routes_file)
        source = str(cfg.routes_file)
    else:
        endpoints, routes = cfg.endpoints, cfg.routes
        source = "SPENDSTREAM_NOTIFY__ENDPOINTS / __ROUTES"
    if plan_ids is None:
        from schemas.plans import SAMPLE_PLANS, load_plans

        plan_ids = load_plans(settings.plans_file or SAMPLE_PLANS).ids()
    problems = _problems(cfg, endpoints, routes, set(plan_ids))
    if problems:
        raise ConfigError(
            f"notify routes ({source}) have {len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return RouteTable(
        {e.name: _endpoint(cfg, e) for e in endpoints},
        tuple(Route.from_settings(r) for r in routes),
    )


def _secret(cfg: NotifySettings, name: str) -> str | None:
    secret = cfg.endpoint_secrets.get(name) or cfg.signing_secret
    return None if secret is None else secret.get_secret_value()


def _endpoint(cfg: NotifySettings, e: NotifyEndpoint) -> Endpoint:
    secret = _secret(cfg, e.name)
    assert secret is not None  # checked by _problems
    return Endpoint(
        e.name, e.url.get_secret_value(), tuple(secret_keys(secret)), e.timeout_s, e.concurrency
    )


def _problems(
    cfg: NotifySettings,
    endpoints: list[NotifyEndpoint],
    routes: list[NotifyRoute],
    plan_ids: set[str],
) -> list[str]:
    problems: list[str] = []
    if not endpoints:
        problems.append(
            "no endpoints: set SPENDSTREAM_NOTIFY__ROUTES_FILE (YAML) or "
            "SPENDSTREAM_NOTIFY__ENDPOINTS and SPENDSTREAM_NOTIFY__ROUTES (JSON)"
        )
    names = [e.name for e in endpoints]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"endpoint {name!r} is defined {names.count(name)} times")
    known = set(names)
    named: set[str] = set()
    for index, route in enumerate(routes):
        for name in route.endpoints:
            named.add(name)
            if name not in known:
                problems.append(f"routes[{index}] names endpoint {name!r}, which is not defined")
        for plan in route.plans:
            if plan not in plan_ids:
                problems.append(
                    f"routes[{index}] names plan {plan!r}, which the plans file does not define "
                    f"(it defines {', '.join(sorted(plan_ids))})"
                )
    for name in names:
        if name not in named:
            problems.append(f"endpoint {name!r} is named by no route: it would receive nothing")
        secret = _secret(cfg, name)
        if secret is None:
            problems.append(
                f"endpoint {name!r} has no signing secret: set "
                f"SPENDSTREAM_NOTIFY__ENDPOINT_SECRETS__{name.upper()} or "
                "SPENDSTREAM_NOTIFY__SIGNING_SECRET (whsec_...)"
            )
    for name in sorted(set(cfg.endpoint_secrets) - known):
        problems.append(f"endpoint_secrets names {name!r}, which is not an endpoint")
    return problems
