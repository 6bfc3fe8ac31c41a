"""Shared by the state tests: random streams of transactions, labels and redeliveries."""

from __future__ import annotations

from hypothesis import strategies as st

from detector.state import Event, StateConfig, feature_names

PROPERTY_CONFIG = StateConfig(windows=(5, 30), allowed_lateness=8, retention=40)

_attributes = st.tuples(
    st.sampled_from([0.0, 0.01, 0.1, 1.5, 3.0, 10.0, 99.99]),
    st.sampled_from(["c1", "c2"]),
    st.none() | st.sampled_from(["k1", "k2"]),
    st.none() | st.sampled_from(["t1", "t2", "t3"]),
    st.none() | st.sampled_from(["m1", "m2"]),
    st.none() | st.sampled_from(["FR", "BE"]),
)


@st.composite
def streams(draw: st.DrawFn, retimed: bool = False) -> list[tuple[str, object]]:
    """Transactions drifting forward in time with jitter and ties, redeliveries, labels;
    `retimed`: some redeliveries carry another timestamp than the first delivery's, up to a
    minute either way (further than the lateness and than `PROPERTY_CONFIG`'s retention)."""
    steps: list[tuple[str, object]] = []
    sent: list[Event] = []
    clock = 0.0
    for n in range(draw(st.integers(1, 40))):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            txid = draw(st.sampled_from([e.transaction_id for e in sent] or ["none"]))
            steps.append(("label", (txid, draw(st.booleans()))))
            continue
        if choice == 1 and sent:
            steps.append(("event", draw(st.sampled_from(sent))))  # redelivery
            continue
        if choice == 2 and sent and retimed:
            again = draw(st.sampled_from(sent))
            shift = draw(st.sampled_from([-60.0, -13.0, -2.5, 1.0, 9.0, 41.0, 60.0]))
            steps.append(("event", again._replace(timestamp=again.timestamp + shift)))
            continue
        clock += draw(st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.0]))
        jitter = draw(st.integers(-12, 0) | st.floats(-12, 0).map(lambda x: round(x, 2)))
        amount, customer, card, terminal, merchant, country = draw(_attributes)
        # Random prefixes make transaction_id order differ from arrival order for ties.
        txid = draw(st.sampled_from(["a", "b", "c"])) + str(n)
        event = Event(txid, clock + jitter, amount, customer, card, terminal, merchant, country)
        sent.append(event)
        steps.append(("event", event))
    return steps


needed_features = st.none() | st.frozensets(
    st.sampled_from(sorted(feature_names(PROPERTY_CONFIG.windows))), max_size=6
)
