"""The replay window shared by every signed request (lease, move, PU proof, command)."""

from xenpool.freshness import FreshOnce


def test_a_request_is_taken_only_while_fresh_and_only_once():
    window = FreshOnce(60.0)
    assert window.too_old(1000 - 61, 1000) and window.too_old(1000 + 61, 1000)
    assert not window.too_old(1000 - 60, 1000)
    assert not window.replayed(b"mac", 1000)
    window.take(b"mac", 1000)
    assert window.replayed(b"mac", 1000 + 119)  # could still pass the age check
    assert not window.replayed(b"mac", 1000 + 121)  # forgotten once it could not
    assert window.taken == {}
