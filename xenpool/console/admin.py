"""Host commands (drain, resume) signed with the pool secret, and the PE's /admin page.

The operator's ``xenpool host drain HOST`` POSTs a JSON command to the PE's status
endpoint (``xenpool vm stop|start NAME`` to the keeper's, the VM's name as the target): ``{"action", "host", "issued_s", "nonce", "mac"}``, the MAC an HMAC-SHA256
with the pool secret over the other fields, as planned moves are signed. The PE takes a
command only for its own host name, within ``MAX_AGE_S`` of its clock and once (a replay
is refused), and answers one JSON object: ``{"ok": bool, "message": str, ...}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets as _secrets
from collections.abc import Callable

from twisted.logger import Logger
from twisted.web import resource

from ..freshness import FreshOnce

log = Logger()

ACTIONS = ("drain", "resume")
MAX_AGE_S = 60.0
MAX_BODY = 4096


def _payload(action: str, host: str, issued_s: int, nonce: str) -> bytes:
    return json.dumps(
        {"action": action, "host": host, "issued_s": issued_s, "nonce": nonce},
        sort_keys=True,
    ).encode()


def sign(secret: bytes, action: str, host: str, issued_s: int, nonce: str = "") -> dict:
    """A signed host command, ready to be POSTed as JSON."""
    nonce = nonce or _secrets.token_hex(8)
    mac = hmac.new(
        secret,
        b"xenpool host command\0" + _payload(action, host, issued_s, nonce),
        hashlib.sha256,
    ).hexdigest()
    return {
        "action": action,
        "host": host,
        "issued_s": issued_s,
        "nonce": nonce,
        "mac": mac,
    }


class CommandError(ValueError):
    """A command refused; the message is one line for the operator."""


class HostCommands:
    """Checks a host command (sans-IO): signature, age, replay, host; then runs it."""

    def __init__(
        self,
        secret: bytes | None,
        host: str,
        clock,
        run: Callable[..., dict],  # (action) or, with check_target, (action, host)
        actions: tuple[str, ...] = ACTIONS,
        check_target: Callable[[str], str | None] | None = None,
    ) -> None:
        """``host``: this daemon's name, for messages, and the only target taken unless
        ``check_target`` (the refusal for a target, or None) says otherwise; ``run``
        gets the action (and with ``check_target``, the target too)."""
        self.secret, self.host, self.clock, self.run = secret, host, clock, run
        self.actions, self.check_target = actions, check_target
        self.commands = FreshOnce(MAX_AGE_S)

    def take(self, body: bytes) -> dict:
        """The answer to one POSTed command; raises CommandError when refused."""
        if not self.secret:
            raise CommandError(
                f"{self.host} has no pool secret (--pool-secret-file): it takes no host commands"
            )
        try:
            command = json.loads(body)
            action, host = str(command["action"]), str(command["host"])
            issued_s, nonce = int(command["issued_s"]), str(command["nonce"])
            mac = str(command["mac"])
        except (ValueError, TypeError, KeyError) as err:
            raise CommandError(f"not a host command: {err}") from None
        expected = sign(self.secret, action, host, issued_s, nonce)["mac"]
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            raise CommandError("not signed with this pool's secret")
        now = self.clock.seconds()
        if self.commands.too_old(issued_s, now):
            raise CommandError(
                f"issued {now - issued_s:.0f} s from this host's clock, more than {MAX_AGE_S:.0f} s"
            )
        if self.commands.replayed(mac, now):
            raise CommandError("a replay of a command already taken")
        if action not in self.actions:
            raise CommandError(
                f"unknown action {action!r} (known: {', '.join(self.actions)})"
            )
        if self.check_target is None:
            if host != self.host:
                raise CommandError(f"meant for host {host!r}, this is {self.host!r}")
        elif (refusal := self.check_target(host)) is not None:
            raise CommandError(refusal)
        self.commands.take(mac, now)
        if self.check_target is None:
            return self.run(action)
        return self.run(action, host)


class AdminResource(resource.Resource):
    """``POST /admin``: one signed host command; 200 with the answer, 403 when refused."""

    isLeaf = True

    def __init__(self, commands: HostCommands) -> None:
        super().__init__()
        self.commands = commands

    def render_POST(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        body = request.content.read(MAX_BODY + 1)
        try:
            if len(body) > MAX_BODY:
                raise CommandError(f"a command is at most {MAX_BODY} bytes")
            answer = {"ok": True, **self.commands.take(body)}
        except CommandError as err:
            log.warn("host command refused: {err}", err=str(err))
            request.setResponseCode(403)
            answer = {"ok": False, "message": str(err)}
        return json.dumps(answer).encode()

    def render_GET(self, request) -> bytes:
        request.setResponseCode(405)
        request.setHeader(b"allow", b"POST")
        return b"POST a signed host command\n"
