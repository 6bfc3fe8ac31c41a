"""Simulated card transactions with fraud, after the Fraud Detection Handbook.

The model is the simulated dataset of *Reproducible Machine Learning for Credit Card Fraud
Detection - Practical Handbook* (Le Borgne, Siblini, Lebichot, Bontempi), written from its
description:

- customers live at a uniform point of a 100x100 grid, spend U(5, 100) on average (std = half
  the mean) and make U(0, 4) transactions a day on average; terminals sit at uniform points;
  a customer uses the terminals closer than `radius` (5);
- each day each customer makes Poisson(mean) transactions at a time of day ~ Normal(12:00,
  20000 s) (dropped outside the day), amount ~ Normal(mean, std) (redrawn U(0, 2 mean) when
  negative, rounded to cents), at a terminal chosen uniformly among the customer's;
- fraud: (1) every amount > 220; (2) each day 2 terminals are compromised for 28 days and all
  their transactions are fraud; (3) each day 3 customers are compromised for 14 days and a
  third of their transactions in that window get amount x5 and are fraud. A later scenario
  overrides an earlier one, as in the book.

One addition the book does not have, so that merchant-level features and rules see hot
entities: terminals belong to merchants. Every merchant runs at least one terminal and the
other terminals go to merchants with Zipf weights (merchant k, counting from 1, draws with
weight 1/k), so a few chains hold a large share of the terminals and of the traffic; a
merchant's terminals are spread over the whole grid, and each merchant has one category code
(MCC). Each transaction carries its terminal's `merchant` and `merchant_category`. These draws
come from their own generator, so the transactions, amounts and frauds of a seed are the same
with or without merchants (`merchants=0` leaves the fields out).

Two deliberate differences, both so that days can be generated one at a time and streamed:

- scenario 3 marks each transaction of a compromised customer in the window with probability
  1/3 (the book picks exactly floor(n/3) of them: the same expectation);
- the compromise rates (2 terminals, 3 customers a day) are for the book's 10,000 terminals
  and 5,000 customers and scale with the population, so a small run keeps a realistic fraud
  rate. Fractional rates are spread evenly over the days (0.2 a day: one every fifth day).

Everything is drawn from numpy generators seeded by (seed, purpose, day), so a run is
deterministic for a seed and the first N transactions do not depend on how many follow.

Python API: `generate(config)` yields one `DayBatch` of numpy arrays per day;
`records(config)` yields one `SimulatedTransaction` (JSON line + label) per transaction, in
event-time order.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import numpy.typing as npt

from publisher.errors import UsageError
from publisher.labels import label_json

SECONDS_PER_DAY = 86_400
BOOK_CUSTOMERS = 5_000
BOOK_TERMINALS = 10_000
TERMINAL_COMPROMISE_DAYS = 28
CUSTOMER_COMPROMISE_DAYS = 14
LARGE_AMOUNT = 220.0
# Merchants by default: one for this many terminals. Merchant k (from 1) draws terminals with
# weight 1 / k ** MERCHANT_ZIPF_EXPONENT.
TERMINALS_PER_MERCHANT = 5
MERCHANT_ZIPF_EXPONENT = 1.0
# Merchant category codes (ISO 18245) a merchant draws from, uniformly: grocery, restaurants,
# miscellaneous retail, fuel, department stores, electronics, transit, drug stores, hotels,
# clothing. Fraud does not depend on them.
MERCHANT_CATEGORIES = (
    "5411",
    "5812",
    "5999",
    "5541",
    "5311",
    "5732",
    "4111",
    "5912",
    "7011",
    "5651",
)

# Purposes mixed into the seed so each kind of draw has its own independent stream.
_POPULATION, _DAY, _COMPROMISE, _SCENARIO3, _MERCHANTS = 1, 2, 3, 4, 5

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. Defaults are the book's: about 1.75 M transactions, 0.84 % fraud.

    Attributes:
        seed: the run is a pure function of the config, this included.
        customers, terminals: population sizes (book: 5,000 and 10,000).
        days: length of the period; start: its first day (book: 183 days from 2018-04-01).
        radius: a customer uses the terminals closer than this (grid is 100x100).
        from_day: yield days from this one on. Earlier days are still simulated (not
            formatted), so ids, compromises and labels are those of the full period: use it
            to skip the weeks in which compromises build up to their steady rate.
        terminals_compromised_per_day, customers_compromised_per_day: None scales the
            book's 2 and 3 a day to the population.
        merchants: how many merchants run the terminals (at most `terminals`); None is one
            for every TERMINALS_PER_MERCHANT terminals, 0 leaves the merchant fields out.
    """

    seed: int = 0
    customers: int = BOOK_CUSTOMERS
    terminals: int = BOOK_TERMINALS
    days: int = 183
    start: dt.date = dt.date(2018, 4, 1)
    radius: float = 5.0
    terminals_compromised_per_day: float | None = None
    customers_compromised_per_day: float | None = None
    from_day: int = 0
    merchants: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.from_day < max(self.days, 1):
            problems.append(
                f"from_day: must be in [0, {self.days - 1}] (days - 1), got {self.from_day}"
            )
        for name in ("customers", "terminals", "days"):
            value = getattr(self, name)
            if value < 1:
                problems.append(f"{name}: must be >= 1, got {value}")
        if not (self.radius > 0 and math.isfinite(self.radius)):
            problems.append(f"radius: must be a finite number > 0, got {self.radius}")
        if self.seed < 0:
            problems.append(f"seed: must be >= 0, got {self.seed}")
        if self.merchants is not None and not 0 <= self.merchants <= max(self.terminals, 1):
            problems.append(
                f"merchants: must be in [0, {self.terminals}] (terminals), got {self.merchants}"
            )
        for name in ("terminals_compromised_per_day", "customers_compromised_per_day"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                problems.append(f"{name}: must be a finite number >= 0, got {value}")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def merchant_count(self) -> int:
        """How many merchants there are (0: transactions carry no merchant)."""
        if self.merchants is not None:
            return self.merchants
        return max(1, self.terminals // TERMINALS_PER_MERCHANT)

    @property
    def terminal_compromise_rate(self) -> float:
        """Terminals compromised per day."""
        if self.terminals_compromised_per_day is not None:
            return self.terminals_compromised_per_day
        return 2.0 * self.terminals / BOOK_TERMINALS

    @property
    def customer_compromise_rate(self) -> float:
        """Customers compromised per day."""
        if self.customers_compromised_per_day is not None:
            return self.customers_compromised_per_day
        return 3.0 * self.customers / BOOK_CUSTOMERS

    @property
    def epoch(self) -> int:
        """Unix time of the first second of the period (UTC)."""
        start = dt.datetime.combine(self.start, dt.time(), tzinfo=dt.UTC)
        return int(start.timestamp())


@dataclass(frozen=True, eq=False)
class Merchants:
    """Which merchant runs each terminal, and each merchant's category.

    Attributes:
        of_terminal: the merchant index of each terminal; merchant 0 runs the most terminals.
        category: per merchant, an index into MERCHANT_CATEGORIES.
    """

    of_terminal: IntArray
    category: IntArray

    @property
    def terminal_counts(self) -> IntArray:
        """How many terminals each merchant runs."""
        counts: IntArray = np.bincount(self.of_terminal, minlength=len(self.category))
        return counts


@dataclass(frozen=True, eq=False)
class Population:
    """Customer and terminal profiles, and which terminals each customer uses.

    The terminals of customer c are `neighbours[offsets[c]:offsets[c + 1]]` (CSR layout).
    `merchants` is None when the config asks for none.
    """

    customer_xy: FloatArray
    mean_amount: FloatArray
    std_amount: FloatArray
    mean_per_day: FloatArray
    terminal_xy: FloatArray
    offsets: IntArray
    neighbours: IntArray
    merchants: Merchants | None = None

    @property
    def terminal_counts(self) -> IntArray:
        """How many terminals each customer can use."""
        return np.diff(self.offsets)


def _rng(config: SimulationConfig, purpose: int, day: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, purpose, day])))


def make_population(config: SimulationConfig) -> Population:
    """Draw customer and terminal profiles and each customer's terminals within the radius."""
    rng = _rng(config, _POPULATION)
    customer_xy = rng.uniform(0, 100, size=(config.customers, 2))
    mean_amount = rng.uniform(5, 100, size=config.customers)
    mean_per_day = rng.uniform(0, 4, size=config.customers)
    terminal_xy = rng.uniform(0, 100, size=(config.terminals, 2))
    offsets, neighbours = neighbours_within(customer_xy, terminal_xy, config.radius)
    return Population(
        customer_xy=customer_xy,
        mean_amount=mean_amount,
        std_amount=mean_amount / 2,
        mean_per_day=mean_per_day,
        terminal_xy=terminal_xy,
        offsets=offsets,
        neighbours=neighbours,
        merchants=draw_merchants(config),
    )


def draw_merchants(config: SimulationConfig) -> Merchants | None:
    """Group the terminals under `config.merchant_count` merchants of Zipf-skewed sizes.

    Each merchant gets one terminal, and the others are dealt with weights 1 / k ** s
    (k = 1 for merchant 0), then the assignment is shuffled over the terminals so that a
    merchant's terminals are spread over the grid. Drawn from the merchants' own generator:
    the other draws of a seed do not change. None when the config asks for no merchants.
    """
    count = config.merchant_count
    if count == 0:
        return None
    rng = _rng(config, _MERCHANTS)
    weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** MERCHANT_ZIPF_EXPONENT
    sizes = 1 + rng.multinomial(config.terminals - count, weights / weights.sum())
    owners = np.repeat(np.arange(count, dtype=np.int64), sizes)
    of_terminal: IntArray = rng.permutation(owners)
    category: IntArray = rng.integers(0, len(MERCHANT_CATEGORIES), size=count, dtype=np.int64)
    return Merchants(of_terminal=of_terminal, category=category)


def neighbours_within(
    customer_xy: FloatArray, terminal_xy: FloatArray, radius: float
) -> tuple[IntArray, IntArray]:
    """For each customer, the terminals closer than `radius`, ascending (CSR layout).

    Returns:
        (offsets, neighbours): the terminals of customer c are
        neighbours[offsets[c]:offsets[c + 1]].

    Terminals are bucketed in square cells at least `radius` wide, so each customer is
    compared only with the 3x3 cells around its own: at the book's scale that is ~2 % of
    the terminals, and the whole search takes tens of milliseconds instead of seconds.
    """
    cells = max(1, min(256, math.floor(100 / radius)))
    size = 100 / cells

    def cell_of(xy: FloatArray) -> tuple[IntArray, IntArray]:
        index = np.clip((xy // size).astype(np.int64), 0, cells - 1)
        return index[:, 0], index[:, 1]

    tx, ty = cell_of(terminal_xy)
    t_key = tx * cells + ty
    t_order = np.argsort(t_key, kind="stable")
    bounds = np.searchsorted(t_key[t_order], np.arange(cells * cells + 1))
    cx, cy = cell_of(customer_xy)
    c_key = cx * cells + cy
    c_order = np.argsort(c_key, kind="stable")
    c_bounds = np.searchsorted(c_key[c_order], np.arange(cells * cells + 1))
    radius2 = radius**2
    found_c: list[IntArray] = [np.empty(0, np.int64)]
    found_t: list[IntArray] = [np.empty(0, np.int64)]
    for key in np.unique(c_key).tolist():
        x, y = divmod(key, cells)
        members = c_order[c_bounds[key] : c_bounds[key + 1]]
        candidates = np.concatenate(
            [
                t_order[bounds[k] : bounds[k + 1]]
                for i in range(max(0, x - 1), min(cells, x + 2))
                for k in range(i * cells + max(0, y - 1), i * cells + min(cells, y + 2))
            ]
        )
        # Rows per chunk keep the distance matrix under ~5 M entries for any radius.
        step = max(1, 5_000_000 // max(1, len(candidates)))
        for first in range(0, len(members), step):
            rows_of = members[first : first + step]
            d2 = (customer_xy[rows_of, None, 0] - terminal_xy[None, candidates, 0]) ** 2 + (
                customer_xy[rows_of, None, 1] - terminal_xy[None, candidates, 1]
            ) ** 2
            rows, cols = np.nonzero(d2 < radius2)
            found_c.append(rows_of[rows])
            found_t.append(candidates[cols])
    pair_c = np.concatenate(found_c)
    pair_t = np.concatenate(found_t)
    order = np.lexsort((pair_t, pair_c))
    offsets = np.zeros(len(customer_xy) + 1, dtype=np.int64)
    np.cumsum(np.bincount(pair_c, minlength=len(customer_xy)), out=offsets[1:])
    neighbours: IntArray = pair_t[order].astype(np.int64)
    return offsets, neighbours


def _spread(rate: float, days: int) -> IntArray:
    """How many compromises happen each day: `rate` a day on average, spread evenly."""
    cumulative: IntArray = np.floor(rate * np.arange(days + 1) + 1e-9).astype(np.int64)
    spread: IntArray = np.diff(cumulative)
    return spread


@dataclass(frozen=True, eq=False)
class Compromises:
    """Per day, which terminals and customers start being compromised that day."""

    terminals: list[IntArray]
    customers: list[IntArray]

    def terminals_active(self, day: int) -> IntArray:
        first = max(0, day - TERMINAL_COMPROMISE_DAYS + 1)
        return np.unique(np.concatenate([np.empty(0, np.int64), *self.terminals[first : day + 1]]))

    def customers_active(self, day: int) -> IntArray:
        first = max(0, day - CUSTOMER_COMPROMISE_DAYS + 1)
        return np.unique(np.concatenate([np.empty(0, np.int64), *self.customers[first : day + 1]]))


def draw_compromises(config: SimulationConfig) -> Compromises:
    """Draw, for every day, the terminals and customers compromised from that day on."""
    rng = _rng(config, _COMPROMISE)
    terminal_counts = _spread(config.terminal_compromise_rate, config.days)
    customer_counts = _spread(config.customer_compromise_rate, config.days)
    terminals = [
        rng.choice(config.terminals, size=min(int(n), config.terminals), replace=False).astype(
            np.int64
        )
        for n in terminal_counts
    ]
    customers = [
        rng.choice(config.customers, size=min(int(n), config.customers), replace=False).astype(
            np.int64
        )
        for n in customer_counts
    ]
    return Compromises(terminals, customers)


@dataclass(frozen=True, eq=False)
class DayBatch:
    """One simulated day: parallel arrays, one row per transaction, in event-time order.

    Attributes:
        day: day number from the start of the period.
        first_index: global index of the first row (transaction ids are "t" + index).
        seconds: event time in seconds since the start of the period.
        customer, terminal: profile indices; amount: in currency units, rounded to cents.
        is_fraud: ground truth; scenario: 0 for genuine, else the fraud scenario (1, 2, 3).
        merchants: who runs each terminal, or None when transactions carry no merchant.
    """

    day: int
    first_index: int
    epoch: int
    seconds: IntArray
    customer: IntArray
    terminal: IntArray
    amount: FloatArray
    is_fraud: BoolArray
    scenario: npt.NDArray[np.int8]
    merchants: Merchants | None = None

    def __len__(self) -> int:
        return len(self.seconds)

    def transaction_ids(self) -> list[str]:
        return [transaction_id(self.first_index + i) for i in range(len(self))]

    def timestamps(self) -> list[str]:
        """RFC 3339 UTC event times, e.g. "2018-04-01T08:14:03Z"."""
        times = (self.epoch + self.seconds).astype("datetime64[s]")
        return [text + "Z" for text in np.datetime_as_string(times, unit="s").tolist()]

    @property
    def merchant(self) -> IntArray | None:
        """The merchant index of each row, or None without merchants."""
        if self.merchants is None:
            return None
        merchant: IntArray = self.merchants.of_terminal[self.terminal]
        return merchant

    def json_lines(self) -> list[bytes]:
        """Each transaction as one compact JSON object (no newline), in row order."""
        rows = zip(
            self.transaction_ids(),
            self.timestamps(),
            self.customer.tolist(),
            self.terminal.tolist(),
            self._merchant_fields(),
            self.amount.tolist(),
            strict=True,
        )
        return [
            (
                f'{{"transaction_id":"{tid}","timestamp":"{ts}",'
                f'"customer_id":"{customer_id(c)}","card_id":"{card_id(c)}",'
                f'"terminal_id":"{terminal_id(t)}"{m},"amount":{a:.2f}}}'
            ).encode()
            for tid, ts, c, t, m, a in rows
        ]

    def _merchant_fields(self) -> list[str]:
        """Per row, the JSON members `,"merchant":...,"merchant_category":...` or ""."""
        merchant = self.merchant
        if self.merchants is None or merchant is None:
            return [""] * len(self)
        fields = [
            f',"merchant":"{merchant_id(m)}","merchant_category":"{MERCHANT_CATEGORIES[k]}"'
            for m, k in enumerate(self.merchants.category.tolist())
        ]
        return [fields[m] for m in merchant.tolist()]

    def label_lines(self) -> list[bytes]:
        """Each label as {"transaction_id", "is_fraud", "scenario"} (no newline)."""
        return [
            label_json(tid, bool(scenario), scenario or None)
            for tid, scenario in zip(self.transaction_ids(), self.scenario.tolist(), strict=True)
        ]

    def records(self) -> list[SimulatedTransaction]:
        """The rows as wire-ready records (JSON line plus label)."""
        rows = zip(
            self.transaction_ids(),
            self.json_lines(),
            (self.epoch + self.seconds).tolist(),
            self.scenario.tolist(),
            strict=True,
        )
        return [
            SimulatedTransaction(tid, event_time, data, bool(scenario), scenario or None)
            for tid, data, event_time, scenario in rows
        ]


def transaction_id(index: int) -> str:
    return f"t{index:09d}"


def customer_id(index: int) -> str:
    return f"cust-{index:05d}"


def card_id(index: int) -> str:
    return f"card-{index:05d}"


def terminal_id(index: int) -> str:
    return f"term-{index:05d}"


def merchant_id(index: int) -> str:
    return f"merch-{index:05d}"


@dataclass(frozen=True, slots=True)
class SimulatedTransaction:
    """One transaction as it goes on the wire, and its ground truth, which never does.

    Attributes:
        transaction_id: "t" + zero-padded global index.
        event_time: Unix seconds of the transaction's timestamp.
        data: the transaction as one compact JSON object (UTF-8, no newline).
        is_fraud, scenario: the label (scenario None for genuine transactions).
    """

    transaction_id: str
    event_time: int
    data: bytes
    is_fraud: bool
    scenario: int | None = field(default=None)

    def label_json(self) -> bytes:
        """The label line: {"transaction_id", "is_fraud", "scenario"}."""
        return label_json(self.transaction_id, self.is_fraud, self.scenario)

    def feedback_json(self) -> bytes:
        """The chargeback message for the detector's feedback topic."""
        fraud = "true" if self.is_fraud else "false"
        return f'{{"transaction_id":"{self.transaction_id}","is_fraud":{fraud}}}'.encode()


def simulate_day(
    config: SimulationConfig,
    population: Population,
    compromises: Compromises,
    day: int,
    first_index: int,
) -> DayBatch:
    """Generate all transactions of one day, sorted by event time, with their labels."""
    rng = _rng(config, _DAY, day)
    per_customer = rng.poisson(population.mean_per_day)
    customer = np.repeat(np.arange(config.customers, dtype=np.int64), per_customer)
    n = len(customer)
    # The book truncates the time of day to whole seconds and keeps 0 < t < 86400.
    time_of_day = rng.normal(SECONDS_PER_DAY / 2, 20_000, size=n).astype(np.int64)
    mean = population.mean_amount[customer]
    amount = rng.normal(mean, population.std_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0, 2 * mean[negative])
    choice = rng.random(n)
    counts = population.terminal_counts[customer]
    keep = (time_of_day > 0) & (time_of_day < SECONDS_PER_DAY) & (counts > 0)
    customer, time_of_day, amount, choice, counts = (
        customer[keep],
        time_of_day[keep],
        np.round(amount[keep], 2),
        choice[keep],
        counts[keep],
    )
    pick = np.minimum((choice * counts).astype(np.int64), counts - 1)
    terminal = population.neighbours[population.offsets[customer] + pick]
    order = np.lexsort((customer, time_of_day))
    customer, time_of_day, amount, terminal = (
        customer[order],
        time_of_day[order],
        amount[order],
        terminal[order],
    )

    scenario = np.zeros(len(customer), dtype=np.int8)
    scenario[amount > LARGE_AMOUNT] = 1
    scenario[np.isin(terminal, compromises.terminals_active(day))] = 2
    third = _rng(config, _SCENARIO3, day).random(len(customer)) < 1 / 3
    stolen = np.isin(customer, compromises.customers_active(day)) & third
    scenario[stolen] = 3
    amount[stolen] = np.round(amount[stolen] * 5, 2)

    return DayBatch(
        day=day,
        first_index=first_index,
        epoch=config.epoch,
        seconds=time_of_day + day * SECONDS_PER_DAY,
        customer=customer,
        terminal=terminal,
        amount=amount,
        is_fraud=scenario > 0,
        scenario=scenario,
        merchants=population.merchants,
    )


def generate(config: SimulationConfig) -> Iterator[DayBatch]:
    """Yield the simulation day by day; each day is generated only when asked for."""
    population = make_population(config)
    compromises = draw_compromises(config)
    first_index = 0
    for day in range(config.days):
        batch = simulate_day(config, population, compromises, day, first_index)
        first_index += len(batch)
        if day >= config.from_day:
            yield batch


def records(config: SimulationConfig) -> Iterator[SimulatedTransaction]:
    """Yield every transaction of the simulation in event-time order."""
    for batch in generate(config):
        yield from batch.records()


def write_jsonl(
    config: SimulationConfig,
    out: IO[bytes],
    labels: IO[bytes] | None = None,
    count: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Write the first `count` transactions (all if None), and their labels, as JSON lines.

    The fast path for files: whole days are formatted and written at once. `progress` is
    called with the number of rows written so far after each day.

    Returns:
        (transactions written, of which fraud).
    """
    written = frauds = 0
    for batch in generate(config):
        rows = len(batch) if count is None else min(len(batch), count - written)
        lines = batch.json_lines()[:rows]
        out.write(b"\n".join(lines) + b"\n" if lines else b"")
        if labels is not None:
            label_lines = batch.label_lines()[:rows]
            labels.write(b"\n".join(label_lines) + b"\n" if label_lines else b"")
        written += rows
        frauds += int(batch.is_fraud[:rows].sum())
        if progress is not None:
            progress(written)
        if count is not None and written >= count:
            break
    return written, frauds
