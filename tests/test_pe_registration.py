"""The PE daemon's handling of its registrar's answers."""

from types import SimpleNamespace

from twisted.logger import capturedLogs, formatEvent

from xenpool.pe.service import PoolElementService
from xenpool.protocol import messages as M


def _pe():
    return SimpleNamespace(
        core=SimpleNamespace(
            settings=SimpleNamespace(pool_handle=b"Xen", pe_identifier=7)
        ),
        registration_watchers=[],
        registered=False,
    )


def test_a_refusal_without_an_operation_error_is_logged_not_raised():
    # RFC 5352 makes the Operation Error optional; the refusal used to raise
    # AttributeError on message.error.causes.
    pe = _pe()
    with capturedLogs() as events:
        PoolElementService.from_registrar(
            pe, M.RegistrationResponse(b"Xen", 7, reject=True), object()
        )
    lines = [formatEvent(e) for e in events]
    assert any(
        "REGISTRATION REFUSED" in line and "no cause given" in line for line in lines
    )
    assert not pe.registered
