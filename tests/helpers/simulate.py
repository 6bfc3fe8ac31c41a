"""A tiny handbook simulation on disk, for the replay and training tests."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from publisher.simulate import SimulationConfig, records


def simulate(folder: Path, days: int = 21) -> tuple[Path, Path]:
    """A tiny handbook simulation (40 customers) written as JSON lines, with its labels."""
    config = SimulationConfig(
        customers=40,
        terminals=1500,
        days=days,
        start=dt.date(2018, 7, 1),
        terminals_compromised_per_day=0.5,
        customers_compromised_per_day=0.5,
    )
    transactions = folder / "tx.jsonl"
    labels = folder / "labels.jsonl"
    with transactions.open("wb") as tx_out, labels.open("wb") as label_out:
        for record in records(config):
            tx_out.write(record.data + b"\n")
            label_out.write(record.label_json() + b"\n")
    return transactions, labels
