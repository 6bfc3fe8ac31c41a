"""`python -m publisher`: files, options and the one-line errors a user sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from stack import services
from tests.helpers.pubsub import run_publisher

SMALL = ["--seed", "5", "--customers", "200", "--terminals", "400", "--days", "5"]


run = run_publisher


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit code not 0, stderr is one `error: ...` line containing the fragments."""
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_simulate_out_is_deterministic_and_labels_stay_aside(tmp_path: Path) -> None:
    """Same seed, same files; transactions carry no truth, labels have one line each."""
    for name in ("a", "b"):
        result = run(
            "simulate", *SMALL, "--out", str(tmp_path / f"{name}.jsonl"),
            "--labels", str(tmp_path / f"{name}-labels.jsonl"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == ""
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    transactions = [orjson.loads(x) for x in (tmp_path / "a.jsonl").read_bytes().splitlines()]
    labels = [orjson.loads(x) for x in (tmp_path / "a-labels.jsonl").read_bytes().splitlines()]
    assert len(transactions) == len(labels) > 1000
    assert [t["transaction_id"] for t in transactions] == [x["transaction_id"] for x in labels]
    assert not any("is_fraud" in t or "scenario" in t for t in transactions)
    assert [t["timestamp"] for t in transactions] == sorted(t["timestamp"] for t in transactions)
    assert transactions[0]["timestamp"].startswith("2018-04-01T")
    assert f"wrote {len(transactions):,} transactions" in result.stderr


def test_paced_and_unpaced_files_are_identical(tmp_path: Path) -> None:
    """The fast file writer and the paced streaming loop write the same bytes."""
    fast = run("simulate", *SMALL, "--count", "700", "--out", str(tmp_path / "fast.jsonl"))
    paced = run(
        "simulate", *SMALL, "--count", "700", "--rate", "100000",
        "--out", str(tmp_path / "paced.jsonl"), "--labels", str(tmp_path / "labels.jsonl"),
    )  # fmt: skip
    assert fast.returncode == 0 and paced.returncode == 0, fast.stderr + paced.stderr
    assert (tmp_path / "fast.jsonl").read_bytes() == (tmp_path / "paced.jsonl").read_bytes()
    assert len((tmp_path / "fast.jsonl").read_bytes().splitlines()) == 700
    assert len((tmp_path / "labels.jsonl").read_bytes().splitlines()) == 700


def test_merchants_option_sets_the_number_of_merchants(tmp_path: Path) -> None:
    """--merchants N names N merchants; 0 writes the stream without merchant fields."""
    few, none = tmp_path / "few.jsonl", tmp_path / "none.jsonl"
    assert run("simulate", *SMALL, "--merchants", "4", "--out", str(few)).returncode == 0
    assert run("simulate", *SMALL, "--merchants", "0", "--out", str(none)).returncode == 0
    with_merchants = [orjson.loads(line) for line in few.read_bytes().splitlines()]
    without = [orjson.loads(line) for line in none.read_bytes().splitlines()]
    assert {tx["merchant"] for tx in with_merchants} == {f"merch-0000{i}" for i in range(4)}
    for tx in with_merchants:
        del tx["merchant"], tx["merchant_category"]
    assert with_merchants == without
    result = run("simulate", *SMALL, "--merchants", "401", "--out", str(few))
    assert_one_line_error(result, "merchants: must be in [0, 400] (terminals), got 401")


def test_start_and_seed_options_change_the_output(tmp_path: Path) -> None:
    """--start moves the timestamps; --seed changes the draws."""
    out = tmp_path / "out.jsonl"
    result = run("simulate", *SMALL, "--start", "2024-02-29", "--count", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    first = orjson.loads(out.read_bytes().splitlines()[0])
    assert first["timestamp"].startswith("2024-02-29T")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["simulate", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["simulate", "--count", "0"], ["--count", "must be >= 1, got 0"]),
        (["simulate", "--customers", "ten"], ["--customers", "must be an integer, got 'ten'"]),
        (["simulate", "--rate", "-5"], ["--rate", "must be a finite number > 0, got -5"]),
        (["simulate", "--rate", "5", "--speedup", "60"], ["--speedup", "not allowed with"]),
        (["simulate", "--start", "2018-13-01"], ["--start", "YYYY-MM-DD, got '2018-13-01'"]),
        (["simulate", "--label-delay", "3w"], ["--label-delay", "got '3w'"]),
        (["watch"], ["--subscription"]),
        (["watch", "--subscription", "s", "--idle-timeout", "0"], ["--idle-timeout"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ],
)
def test_usage_mistakes_are_one_line(args: list[str], fragments: list[str]) -> None:
    """Bad options print one `error:` line naming the option, exit 2, no traceback."""
    result = run(*args)
    assert_one_line_error(result, *fragments)
    assert result.returncode == 2


def test_unwritable_out_is_one_line(tmp_path: Path) -> None:
    """An --out in a missing directory names the option and the path."""
    target = tmp_path / "nowhere" / "out.jsonl"
    result = run("simulate", *SMALL, "--out", str(target))
    assert_one_line_error(result, "--out: cannot write", str(target), "No such file")


def test_unwritable_labels_is_one_line(tmp_path: Path) -> None:
    """An unwritable --labels names the option."""
    target = tmp_path / "nowhere" / "labels.jsonl"
    result = run("simulate", *SMALL, "--out", str(tmp_path / "o.jsonl"), "--labels", str(target))
    assert_one_line_error(result, "--labels: cannot write", str(target))


def test_feedback_with_out_is_refused(tmp_path: Path) -> None:
    """Asking for feedback messages while writing a file is a contradiction."""
    result = run("simulate", "--out", str(tmp_path / "o.jsonl"), "--label-delay", "1d")
    assert_one_line_error(result, "nothing is published with --out")


def test_missing_project_is_one_line(tmp_path: Path) -> None:
    """Publishing without a project says how to give one."""
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_CLOUD_PROJECT"}
    result = subprocess.run(
        [sys.executable, "-m", "publisher", "simulate", *SMALL],
        cwd=services.ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_one_line_error(result, "--project", "GOOGLE_CLOUD_PROJECT")


def test_republish_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    """republish names the file it cannot find."""
    result = run("republish", str(tmp_path / "nope.jsonl"), "--project", "p")
    assert_one_line_error(result, "nope.jsonl", "does not exist")


def test_replay_is_not_a_publisher_command(tmp_path: Path) -> None:
    """The old verb is refused as any unknown command is; the backtest is the detector's."""
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text('{"amount": 1, "customer_id": "c"}\n')
    result = run("replay", str(recorded), "--project", "p")
    assert_one_line_error(result, "invalid choice: 'replay'", "'republish'")
    assert result.returncode == 2
    listed = run("--help")
    assert "republish" in listed.stdout and "replay" not in listed.stdout


def test_watch_with_a_bad_labels_file_is_one_line(tmp_path: Path) -> None:
    """A labels file that is not labels is named with its line number."""
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"transaction_id": "t1", "is_fraud": "yes"}\n')
    result = run("watch", "--subscription", "s", "--labels", str(labels), "--project", "p")
    assert_one_line_error(result, f"--labels: {labels}:1", "is_fraud (boolean)")


def test_help_lists_the_contract_options() -> None:
    """simulate --help shows every option of the command-line contract."""
    result = run("simulate", "--help")
    assert result.returncode == 0
    for option in (
        "--seed", "--customers", "--terminals", "--days", "--start", "--count", "--duration",
        "--rate", "--speedup", "--out", "--labels", "--label-delay", "--topic", "--merchants",
        "--feedback-topic", "--project",
    ):  # fmt: skip
        assert option in result.stdout


@pytest.mark.integration
@pytest.mark.parametrize("command", ["simulate", "republish", "watch"])
def test_unreachable_emulator_is_one_line(command: str, tmp_path: Path) -> None:
    """A PUBSUB_EMULATOR_HOST where nothing listens is named in the error, for each command."""
    host = f"127.0.0.1:{services.free_port()}"
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text('{"amount": 1, "customer_id": "c"}\n')
    args = {
        "simulate": ["simulate", *SMALL],
        "republish": ["republish", str(recorded)],
        "watch": ["watch", "--subscription", "verdicts"],
    }[command]
    result = run(*args, "--project", "p", env={"PUBSUB_EMULATOR_HOST": host})
    assert_one_line_error(result, "cannot reach Pub/Sub", f"emulator at {host}")


@pytest.mark.integration
def test_missing_topic_is_one_line(pubsub_env: dict[str, str]) -> None:
    """Publishing to a topic that does not exist names it, before sending anything."""
    topic = services.unique("missing")
    result = run("simulate", *SMALL, "--topic", topic, env=pubsub_env)
    assert_one_line_error(result, "--topic", f"projects/fraud-test/topics/{topic} does not exist")


@pytest.mark.integration
def test_missing_subscription_is_one_line(pubsub_env: dict[str, str]) -> None:
    """Watching a subscription that does not exist names it."""
    name = services.unique("missing")
    result = run("watch", "--subscription", name, env=pubsub_env)
    assert_one_line_error(result, "--subscription", f"{name} does not exist")


def test_no_emulator_and_no_credentials_is_one_line(tmp_path: Path) -> None:
    """Without PUBSUB_EMULATOR_HOST and without credentials the error says what to set."""
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "absent.json")
    result = subprocess.run(
        [sys.executable, "-m", "publisher", "simulate", *SMALL, "--project", "p"],
        cwd=services.ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_one_line_error(
        result, "cannot create a Pub/Sub client for Google Cloud", "set PUBSUB_EMULATOR_HOST"
    )
