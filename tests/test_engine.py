"""The detection core: a batch decides exactly as the same transactions one by one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from detector.config import DetectorConfig, build_detector
from detector.engine import Request
from detector.state import MemoryStore
from detector.transaction import decode

START = datetime(2026, 1, 1, tzinfo=UTC)


def requests(count: int) -> list[Request]:
    """A small stream: two customers, repeated cards and terminals, some large amounts."""
    out = []
    for n in range(count):
        line = (
            f'{{"transaction_id": "t{n}", "amount": {(n * 37) % 1500 + 0.5}, '
            f'"customer_id": "c{n % 2}", "card_id": "k{n % 3}", "terminal_id": "T{n % 4}", '
            f'"timestamp": "{(START + timedelta(minutes=7 * n)).isoformat()}"}}'
        ).encode()
        raw, transaction = decode(line)
        out.append(Request(raw, transaction, f"m{n}", START, START))
    return out


def test_decide_many_gives_the_verdicts_of_decide_one_by_one() -> None:
    """Same decisions, scores, reasons and bodies, batch or not, with state and a model."""
    batch = requests(60)
    one = build_detector(DetectorConfig(), MemoryStore())
    many = build_detector(DetectorConfig(), MemoryStore())
    expected = [
        one.decide(
            r.raw,
            r.transaction,
            message_id=r.message_id,
            default_time=r.default_time,
            decided_at=r.decided_at,
        ).body
        for r in batch
    ]
    got = [v.body for b in (batch[:25], batch[25:26], batch[26:]) for v in many.decide_many(b)]
    assert got == expected
    assert any(body["decision"] != "allow" for body in got)  # the stream exercises the rules
