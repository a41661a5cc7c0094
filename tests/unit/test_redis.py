"""Redis as the real program builds it for each stack, under Pulumi mocks; its settings rules."""

from __future__ import annotations

from tests.support.redis import problems


def test_the_volume_must_hold_two_aof_copies() -> None:
    # 4096 MiB of maxmemory: two AOF copies need 8 GiB
    assert (
        "redis.volumeGib=7: must hold two AOF copies of maxmemoryMib=4096 (a rewrite "
        "writes the new file beside the old one); use at least 8"
    ) in problems("prod", redis={"volumeGib": 7})


def test_ttls_and_maxmemory_must_be_positive() -> None:
    text = problems("dev", redis={"maxmemoryMib": 0, "sessionTtlSeconds": 0})
    assert "redis.maxmemoryMib=0: must be greater than 0" in text
    assert "redis.sessionTtlSeconds=0: must be greater than 0" in text
