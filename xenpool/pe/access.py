"""Who may ask a PE for what: the pool users (PUs) it knows, how each proves who it is,
and which VMs each may manage (``--pu-access FILE``). Sans-IO: the time comes from a clock.

A PU proves who it is for each create, cookie echo (adoption, failover) and stop either

* by a TLS client certificate whose subject CN is its name, on a session port that
  requires certificates (``ssl:...:caCertsDir=DIR``, ``xenpool.tls``), or
* by a ``PuProof`` sent just before the request: HMAC-SHA256 with the PU's secret over its
  name, the wall-clock time, a nonce and the encoded request (``session.pu_proof_mac``).
  A proof is good for that one request, once, within ``MAX_AGE_S`` of the PE's clock.

The file, one section per PU::

    [pu keeper]
    # its secret (relative paths are relative to this file); without one, only a TLS
    # client certificate with CN=keeper proves it
    secret-file = keeper.secret
    # ServerIDs it may create, adopt and stop (shell patterns, space separated)
    vms = web* db*
"""

from __future__ import annotations

import fnmatch
import hmac
import os
from dataclasses import dataclass

from twisted.python import usage

from ..config import read_ini, secret_file
from ..freshness import FreshOnce
from ..protocol import session as S


@dataclass(frozen=True)
class PuRule:
    name: str
    secret: bytes | None  # None: only a TLS client certificate proves this PU
    vms: tuple[str, ...]  # fnmatch patterns of the ServerIDs it may manage


class PuAccess:
    MAX_AGE_S = 60.0  # a proof issued further than this from the PE's clock is refused

    def __init__(self, rules: list[PuRule], clock) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self.clock = clock
        self.proofs = FreshOnce(self.MAX_AGE_S)

    def prove(
        self, proof: S.PuProof | None, request: bytes, tls_name: str | None = None
    ) -> tuple[str | None, str]:
        """(the PU's name, "") when ``proof`` (sent just before ``request``, its
        encoding) or the session's TLS client certificate (CN ``tls_name``) proves a PU
        this PE knows; (None, why not) otherwise."""
        if proof is not None:
            rule = self.rules.get(proof.pu_name)
            if rule is None or rule.secret is None:
                return None, f"PU {proof.pu_name!r} has no secret at this PE"
            expected = S.pu_proof_mac(
                rule.secret, proof.pu_name, proof.issued_ms, proof.nonce, request
            )
            if not hmac.compare_digest(proof.mac, expected):
                return None, f"the proof of PU {proof.pu_name!r} is wrong"
            now = self.clock.seconds()
            if self.proofs.too_old(proof.issued_ms / 1000, now):
                return (
                    None,
                    f"the proof was issued {now - proof.issued_ms / 1000:.0f} s from now, "
                    f"more than {self.MAX_AGE_S:.0f} s (are the clocks right?)",
                )
            if self.proofs.replayed(proof.mac, now):
                return None, "a replay of a proof already taken"
            self.proofs.take(proof.mac, now)
            return proof.pu_name, ""
        if tls_name is not None and tls_name in self.rules:
            return tls_name, ""
        if tls_name is not None:
            return None, f"no PU {tls_name!r} (the TLS certificate's CN) at this PE"
        return None, "the PU did not prove who it is (no PU proof, no TLS certificate)"

    def allows(self, name: str, server_id: str) -> bool:
        rule = self.rules.get(name)
        return rule is not None and any(
            fnmatch.fnmatchcase(server_id, pattern) for pattern in rule.vms
        )


def read_access(path: str) -> list[PuRule]:
    """The ``[pu NAME]`` sections of ``--pu-access FILE``; a bad file is a UsageError."""
    parser = read_ini(path, "pu-access")
    rules = []
    for section in parser.sections():
        kind, _, name = section.partition(" ")
        name = name.strip()
        if kind != "pu" or not name:
            raise usage.UsageError(
                f"--pu-access: [{section}]: expected [pu NAME] sections"
            )
        values = parser[section]
        unknown = set(values) - {"secret-file", "vms"}
        if unknown:
            raise usage.UsageError(
                f"--pu-access: [{section}]: unknown key {sorted(unknown)[0]!r} (known: secret-file, vms)"
            )
        secret = None
        if values.get("secret-file"):
            where = os.path.join(
                os.path.dirname(os.path.abspath(path)), values["secret-file"]
            )
            try:
                secret = secret_file(where)
            except ValueError as err:
                raise usage.UsageError(f"--pu-access: [{section}]: {err}") from None
        rules.append(PuRule(name, secret, tuple(values.get("vms", "").split())))
    return rules
