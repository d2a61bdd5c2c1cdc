"""The portal as a JupyterHub service: Hub users enrol as themselves, verified by the Hub.

A single-user server (and each of its kernels) started by JupyterHub has the user's own API
token in ``JUPYTERHUB_API_TOKEN``. ``grid_portal.hubconnect`` sends that token, with a fresh
certificate request, to ``POST /api/hub/enrol``. The portal never takes the user's word for who
they are: it asks the Hub (``GET {hub_api}/user`` with that token), and the Hub answers with the
token owner's model. Every Hub token may read its owner's name, ``admin`` flag and groups
there (JupyterHub adds the "identify" scopes to ``/user`` for any token), so a server's token,
whose own scopes are only ``users:activity!user`` and ``access:servers!server``, is enough.
The certificate's CN is the Hub user's name, so jobs are owned by that name (the portal
reads it from the TLS session, as for everyone else). A request that claims another name is
refused.

Teachers: a Hub admin (unless ``admins_are_teachers`` is off) or a member of one of the
configured teacher groups gets a certificate with the ``teacher`` role: they see everyone's
jobs, cancel any job and set per-student quotas (``grid-portal fairshare``), and may mint join
tokens for the lab's machines (``POST /api/hub/token``). They are not the portal's admin: a
teacher's certificate runs no code on the portal and none on volunteers outside tasks
(grid_portal/protocol.py).

``configure_jupyterhub(c, ...)`` is the ``jupyterhub_config.py`` snippet: it adds the portal as
a Hub-managed service (the Hub starts and stops it, and gives it ``JUPYTERHUB_API_URL``) and
tells every spawned server where the portal is and which CA to expect (``GRID_PORTAL_URL``,
``GRID_PORTAL_CA_PIN``). See docs/classroom.md.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from grid_portal.errors import EnrolmentRefused, GridError, UsageError
from grid_portal.hubconnect import ENV_CA_PIN, ENV_PORTAL_URL
from grid_portal.portal.http import MAX_BODY, BaseHandler, PortalContext, _bracket, _serial_of
from grid_portal.portal.security import check_csr
from grid_portal.protocol import TEACHER

logger = logging.getLogger("grid_portal.portal.hub")

TEACHER_ROLE = TEACHER  # sees and cancels everyone's jobs; not the portal's admin
STUDENT_ROLE = "client"
HUB_CERT_DAYS = 3.0  # short-lived: hubconnect enrols again, silently, a day before its end
# Every student's server reaches the portal from the same address (the Hub's machine): the
# Hub's own check of each token is the gate, this only stops a runaway loop.
HUB_ENROL_RATE_PER_MINUTE = 300
MAX_TOKEN_LENGTH = 512


class HubUnavailable(GridError):
    """The Hub's API could not be asked."""


@dataclass(frozen=True)
class HubSettings:
    """How the portal reaches the Hub, and who counts as a teacher."""

    api_url: str  # e.g. http://127.0.0.1:8081/hub/api
    teacher_groups: tuple[str, ...] = ()
    admins_are_teachers: bool = True
    cert_days: float = HUB_CERT_DAYS
    timeout: float = 10.0

    @classmethod
    def from_env(
        cls,
        api_url: str | None = None,
        teacher_groups: Sequence[str] = (),
        admins_are_teachers: bool = True,
    ) -> HubSettings:
        """Settings from options, else from the environment the Hub gives a managed service."""
        url = (api_url or os.environ.get("JUPYTERHUB_API_URL") or "").strip().rstrip("/")
        if not url:
            raise UsageError(
                "--jupyterhub needs the Hub's API URL: run the portal as a JupyterHub service "
                "(see docs/classroom.md), which sets JUPYTERHUB_API_URL, or give --hub-api-url "
                "http://HUB:8081/hub/api"
            )
        if not url.startswith(("http://", "https://")):
            raise UsageError(
                f"Hub API URL {url!r}: give an http:// or https:// URL ending in /hub/api"
            )
        groups = tuple(g.strip() for g in teacher_groups if g and g.strip())
        return cls(api_url=url, teacher_groups=groups, admins_are_teachers=admins_are_teachers)


@dataclass(frozen=True)
class HubUser:
    name: str
    admin: bool = False
    groups: tuple[str, ...] = ()


def role_for(user: HubUser, settings: HubSettings) -> str:
    """``admin`` for teachers (Hub admins, members of a teacher group), else ``client``."""
    if settings.admins_are_teachers and user.admin:
        return TEACHER_ROLE
    if set(user.groups) & set(settings.teacher_groups):
        return TEACHER_ROLE
    return STUDENT_ROLE


def user_from_model(model: Any) -> HubUser:
    """The Hub's answer to ``GET /user`` as a HubUser; refuses anything but a user."""
    if not isinstance(model, dict):
        raise HubUnavailable("the Hub's answer about the token was not a JSON object")
    if model.get("kind", "user") != "user":
        raise EnrolmentRefused(
            f"this token belongs to a Hub {model.get('kind')!r}, not to a user: enrol from a "
            "user's server with its own JUPYTERHUB_API_TOKEN"
        )
    name = model.get("name")
    if not isinstance(name, str) or not name.strip():
        raise HubUnavailable("the Hub's answer about the token named no user")
    groups = model.get("groups") or []
    return HubUser(
        name=name,
        admin=model.get("admin") is True,
        groups=tuple(str(g) for g in groups if isinstance(g, str)),
    )


async def identify(settings: HubSettings, token: str) -> HubUser:
    """Ask the Hub who owns ``token`` (``GET {api_url}/user``)."""
    try:
        response = await AsyncHTTPClient().fetch(
            f"{settings.api_url}/user",
            headers={"Authorization": f"token {token}", "Accept": "application/json"},
            request_timeout=settings.timeout,
            follow_redirects=False,
            raise_error=False,
        )
    except (OSError, HTTPClientError) as exc:
        raise HubUnavailable(f"cannot reach the Hub's API at {settings.api_url}: {exc}") from None
    if response.code in (401, 403):
        raise EnrolmentRefused(
            "JupyterHub does not accept this token: it is not a Hub user's token, or it "
            "expired; restart your server from the Hub's home page"
        )
    if response.code != 200:
        reason = response.error if response.code == 599 else f"HTTP {response.code}"
        raise HubUnavailable(f"the Hub's API at {settings.api_url} answered {reason}")
    try:
        model = json.loads(response.body or b"null")
    except ValueError:
        raise HubUnavailable("the Hub's answer about the token was not JSON") from None
    return user_from_model(model)


def _bearer(header: str | None) -> str | None:
    """The token in ``Authorization: token T`` (JupyterHub's form) or ``Bearer T``."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() not in ("token", "bearer") or not value:
        return None
    if len(value) > MAX_TOKEN_LENGTH or not value.isascii() or not value.isprintable():
        return None
    return value


class _HubHandler(BaseHandler):
    _recent: dict[str, deque[float]] = defaultdict(deque)

    def initialize(self, portal: PortalContext, hub: HubSettings) -> None:  # type: ignore[override]
        super().initialize(portal)
        self.hub = hub

    def _rate_limited(self) -> bool:
        window = self._recent[self.request.remote_ip or "?"]
        now = time.monotonic()
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= HUB_ENROL_RATE_PER_MINUTE:
            return True
        window.append(now)
        return False

    def _body(self) -> dict[str, Any] | None:
        if len(self.request.body) > MAX_BODY:
            self.write_json({"error": "request too large"}, 413)
            return None
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.write_json({"error": "send a JSON object"}, 400)
            return None
        return body

    async def _hub_user(self) -> HubUser | None:
        """The verified Hub user behind the request's token; None once an error was sent."""
        token = _bearer(self.request.headers.get("Authorization"))
        if token is None:
            self.set_header("WWW-Authenticate", "token")
            self.write_json(
                {
                    "error": "send the Hub user's API token: Authorization: token "
                    "$JUPYTERHUB_API_TOKEN (set in every server the Hub starts)"
                },
                401,
            )
            return None
        try:
            return await identify(self.hub, token)
        except EnrolmentRefused as exc:
            logger.info("Hub enrolment refused from %s: %s", self.request.remote_ip, exc)
            self.write_json({"error": str(exc)}, 403)
        except HubUnavailable as exc:
            logger.warning("cannot check a Hub token: %s", exc)
            self.write_json({"error": f"{exc}; try again in a moment"}, 503)
        return None


class HubEnrolHandler(_HubHandler):
    """``POST /api/hub/enrol``: ``{"csr": PEM, "name": optional}`` + the user's Hub token."""

    async def post(self) -> None:
        if self._rate_limited():
            self.write_json({"error": "too many enrolment attempts; wait a minute"}, 429)
            return
        body = self._body()
        if body is None:
            return
        csr = body.get("csr")
        claimed = body.get("name")
        if not isinstance(csr, str) or (claimed is not None and not isinstance(claimed, str)):
            self.write_json({"error": "send JSON with 'csr' (PEM) and optionally 'name'"}, 400)
            return
        try:
            check_csr(csr)
        except GridError as exc:
            self.write_json({"error": str(exc)}, 400)
            return
        user = await self._hub_user()
        if user is None:
            return
        if claimed and claimed != user.name:
            # The name is the Hub's answer, never the client's: a mismatch is an attempt to
            # pose as someone else (or a server started with another user's token).
            logger.warning(
                "Hub user %r from %s asked to enrol as %r: refused",
                user.name,
                self.request.remote_ip,
                claimed,
            )
            self.write_json(
                {
                    "error": f"this Hub token belongs to {user.name!r}, not {claimed!r}: a Hub "
                    "user can only enrol as themselves"
                },
                403,
            )
            return
        role = role_for(user, self.hub)
        try:
            cert = self.portal.ca.sign_csr(csr, name=user.name, role=role, days=self.hub.cert_days)
        except GridError as exc:
            self.write_json({"error": str(exc)}, 400)
            return
        self.portal.enrolments.record(user.name, role, _serial_of(cert))
        host = self.portal.contact_host or self.request.host_name
        logger.info("enrolled Hub user %s as %s from %s", user.name, role, self.request.remote_ip)
        self.write_json(
            {
                "name": user.name,
                "role": role,
                "cert": cert,
                "ca": self.portal.ca.cert_pem,
                "scheduler": f"tls://{_bracket(host)}:{self.portal.scheduler_port}",
            }
        )


class HubTokenHandler(_HubHandler):
    """``POST /api/hub/token``: a teacher mints a join token for the lab's machines."""

    async def post(self) -> None:
        if self._rate_limited():
            self.write_json({"error": "too many requests; wait a minute"}, 429)
            return
        body = self._body()
        if body is None:
            return
        user = await self._hub_user()
        if user is None:
            return
        if role_for(user, self.hub) != TEACHER_ROLE:
            self.write_json(
                {"error": f"{user.name!r} is not a teacher on this Hub: ask a Hub admin"}, 403
            )
            return
        uses = body.get("uses")
        ttl = body.get("ttl", 8 * 3600.0)
        try:
            created = self.portal.tokens.create(
                ttl=ttl,
                uses=uses,
                note=f"classroom token by {user.name}",
                pin=self.portal.ca.pin(),
                role="node",
            )
        except UsageError as exc:
            self.write_json({"error": str(exc)}, 400)
            return
        host = self.portal.contact_host or self.request.host_name
        port = self.request.host.rpartition(":")[2] if ":" in self.request.host else "443"
        url = f"https://{_bracket(host)}:{port}"
        logger.info("Hub teacher %s created join token %s", user.name, created.id)
        self.write_json(
            {
                "token": created.text,
                "id": created.id,
                "expires_at": created.expires_at,
                "uses": created.uses,
                "portal": url,
                "command": f"grid-portal volunteer {url} --token {created.text}",
            }
        )


def hub_routes(portal: PortalContext, settings: HubSettings | None) -> list[Any]:
    """Tornado rules for ``make_app`` (``PortalContext.extra_routes``); none without a Hub."""
    if settings is None:
        return []
    kwargs = {"portal": portal, "hub": settings}
    return [
        (r"/api/hub/enrol", HubEnrolHandler, kwargs),
        (r"/api/hub/token", HubTokenHandler, kwargs),
    ]


# -- jupyterhub_config.py -------------------------------------------------------------------
def configure_jupyterhub(
    c: Any,
    *,
    data_dir: str | os.PathLike[str],
    host: str | None = None,
    port: int | None = None,
    http_port: int | None = None,
    portal_url: str | None = None,
    teacher_groups: Sequence[str] = ("teachers",),
    admins_are_teachers: bool = True,
    service_name: str = "grid-portal",
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
) -> dict[str, str]:
    """Run the portal as a Hub-managed service and point every user's server at it.

    Call from ``jupyterhub_config.py``::

        from grid_portal.portal.hub import configure_jupyterhub
        configure_jupyterhub(c, data_dir="/srv/grid-portal", teacher_groups=["teachers"])

    Creates the portal's CA now if it does not exist yet (so its pin can go into every
    server's environment), adds ``grid-portal serve --jupyterhub`` to
    ``c.JupyterHub.services`` and ``GRID_PORTAL_URL`` / ``GRID_PORTAL_CA_PIN`` to
    ``c.Spawner.environment``. Returns those two variables. ``host``, ``port`` and
    ``http_port`` left out are the configured ones (``grid-portal.portal.*``).
    """
    from grid_portal import settings
    from grid_portal.portal.security import CertificateAuthority
    from grid_portal.portal.server import advertised_host

    host = settings.given_or(host, "portal.host")
    port = settings.given_or(port, "portal.port")
    http_port = settings.given_or(http_port, "portal.http-port")

    data = Path(data_dir).expanduser().resolve()
    ca = CertificateAuthority.load_or_create(data / "ca")
    url = portal_url or f"https://{_bracket(advertised_host(host))}:{http_port}"
    command = [
        python,
        "-m",
        "grid_portal.cli",
        "serve",
        "--jupyterhub",
        "--data-dir",
        str(data),
        "--host",
        host,
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        *(f"--teacher-group={g}" for g in teacher_groups),
        *(() if admins_are_teachers else ("--no-hub-admin-teachers",)),
        *extra_args,
    ]
    c.JupyterHub.services.append({"name": service_name, "command": command})
    env = {ENV_PORTAL_URL: url, ENV_CA_PIN: ca.pin()}
    c.Spawner.environment.update(env)
    return env
