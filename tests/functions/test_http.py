"""score_transaction through functions-framework's own app: idempotency keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from detector.functions import Service
from tests.helpers.functions import app

ENV = {"GOOGLE_CLOUD_PROJECT": "fraud-test"}  # the bundled rules and model, memory state
SAME = ("decision", "is_fraud", "score", "reasons", "transaction_id", "rules_version")


@pytest.fixture()
def client() -> Iterator[tuple[Any, Service]]:
    with app("score_transaction", "http", ENV) as pair:
        yield pair


def post(client: Any, body: dict[str, Any], key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    response = client.post("/", data=orjson.dumps(body), headers=headers)
    return response.status_code, orjson.loads(response.data)


def test_retries_with_the_same_key_count_once_and_get_the_same_verdict(
    client: tuple[Any, Service],
) -> None:
    """Three POSTs with one Idempotency-Key: one transaction in state, one verdict."""
    http, service = client
    body = {"amount": 1200, "customer_id": "cust-idem", "card_id": "card-idem"}
    answers = [post(http, body, "order-42/attempt") for _ in range(3)]
    assert [status for status, _ in answers] == [200, 200, 200]
    first = answers[0][1]
    assert first["transaction_id"].startswith("idem-")
    for _, verdict in answers[1:]:
        assert {k: verdict[k] for k in SAME} == {k: first[k] for k in SAME}
    other = post(http, body, "order-43")[1]
    assert other["transaction_id"] != first["transaction_id"]
    # What state holds: the customer's history counts two transactions, not four.
    assert _history_count(service, "cust-idem") == 2


def _history_count(service: Service, customer: str) -> int:
    """Transactions the detector has counted for a customer, read through a fresh decision."""
    from datetime import UTC, datetime

    from detector.transaction import validate

    raw = {"amount": 1, "customer_id": customer}
    activation = service.detector.activation(validate(raw), "probe", datetime.now(UTC))
    return int(activation["by_customer"]["count_30d"])  # those before the probe


def test_without_a_key_each_post_is_a_new_transaction(client: tuple[Any, Service]) -> None:
    """No key, no transaction_id: two POSTs are two transactions (callers opt in)."""
    http, service = client
    body = {"amount": 5, "customer_id": "cust-nokey"}
    first, second = post(http, body)[1], post(http, body)[1]
    assert first["transaction_id"] != second["transaction_id"]
    assert _history_count(service, "cust-nokey") == 2


def test_a_transaction_id_in_the_body_wins_over_the_key(client: tuple[Any, Service]) -> None:
    """The body's own id is the transaction's identity; the key is for bodies without one."""
    http, _ = client
    _, verdict = post(http, {"amount": 5, "customer_id": "c", "transaction_id": "t-1"}, "k-1")
    assert verdict["transaction_id"] == "t-1"


@pytest.mark.parametrize(
    "key", ["", "x" * 256, "has space", "semi;colon", "é-accent", "tab\tkey"], ids=repr
)
def test_an_invalid_key_is_400_naming_the_header(client: tuple[Any, Service], key: str) -> None:
    """Keys are 1 to 255 characters of letters, digits and . _ : / -."""
    http, _ = client
    status, body = post(http, {"amount": 5, "customer_id": "c"}, key)
    assert status == 400
    [problem] = body["error"]["fields"]
    assert problem["field"] == "Idempotency-Key"
    assert problem["problem"].startswith("must be 1 to 255 characters of")
