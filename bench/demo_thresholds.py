"""Choose the default ruleset's model thresholds on streams the bundled model never saw.

Usage: .venv/bin/python bench/demo_thresholds.py [--seeds 1,2,3,4] [--days 70] [--out DIR]

For each seed (the bundled model was trained on seed 0; the demo streams seed 7), simulate the
demo's stream (`stack.demo.DemoStream`: its population and compromise rate) over `--days`
days, write the transactions and the chargebacks (frauds only, as the demo reports them),
and replay it with `python -m detector replay --label-delay 7d`: the functions' own code, one
transaction at a time, labels injected when they become known. Then, from the verdicts:

- precision and recall of `score > t` alone, pooled over the seeds and the range per seed;
- for pairs (block above B, review above R): what the whole default ruleset would flag, the
  other rules included (`amount > 1000` blocks, the velocity and behaviour rules review).

Prints Markdown tables on stdout (BENCHMARKS.md, "Demo"). Scores do not depend on the rules,
so one replay per seed serves every pair of thresholds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from stack.demo import DemoStream, messages

ROOT = Path(__file__).resolve().parent.parent
WEEK = 7 * 86_400
MODEL_RULES = ("model-",)  # the rules under study: ids starting with this


@dataclass(frozen=True)
class Row:
    """One verdict of the replay, reduced to what the thresholds need."""

    seed: int
    week: int
    score: float
    fraud: bool
    other_block: bool  # a non-model block rule fired (amount > 1000)
    other_review: bool  # a non-model, non-shadow review rule fired


def replay_seed(seed: int, days: int, out: Path) -> list[Row]:
    config = DemoStream(seed=seed, days=days)
    outgoing, truth = messages(config)
    folder = out / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    tx, labels, verdicts = folder / "tx.jsonl", folder / "chargebacks.jsonl", folder / "v.jsonl"
    tx.write_bytes(b"".join(m.data + b"\n" for m in outgoing))
    labels.write_bytes(b"".join(m.feedback + b"\n" for m in outgoing if m.feedback is not None))
    subprocess.run(
        [sys.executable, "-m", "detector", "replay", "--input", str(tx), "--labels", str(labels),
         "--label-delay", "7d", "--output", str(verdicts), "--workers", "1"],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    first = outgoing[0].event_time
    times = {m.attributes["transaction_id"]: m.event_time for m in outgoing}
    rows = []
    with verdicts.open("rb") as handle:
        for line in handle:
            verdict = orjson.loads(line)
            tid = verdict["transaction_id"]
            fired = [r for r in verdict["reasons"] if not r["shadow"]]
            other = [r for r in fired if not r["rule"].startswith(MODEL_RULES)]
            rows.append(
                Row(
                    seed=seed,
                    week=int((times[tid] - first) // WEEK),
                    score=float(verdict["score"]),
                    fraud=truth[tid].is_fraud,
                    other_block=any(r["action"] == "block" for r in other),
                    other_review=any(r["action"] == "review" for r in other),
                )
            )
    return rows


def ratio(part: int, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "n/a"


def precision_recall(flags: list[bool], rows: list[Row]) -> tuple[int, int, int]:
    """(flagged, of which fraud, frauds)."""
    flagged = sum(flags)
    hits = sum(f and r.fraud for f, r in zip(flags, rows, strict=True))
    return flagged, hits, sum(r.fraud for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="1,2,3,4")
    parser.add_argument("--days", type=int, default=70)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo-thresholds")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[Row] = []
    for seed in seeds:
        print(f"replaying seed {seed}", file=sys.stderr, flush=True)
        rows += replay_seed(seed, args.days, args.out)
    frauds = sum(r.fraud for r in rows)
    print(f"{len(rows):,} transactions, {frauds:,} frauds, seeds {args.seeds}, {args.days} days")
    print()
    print("Model score alone (score > t): precision / recall pooled; per-seed range")
    print()
    print("| t | flagged | precision | recall | precision per seed | recall per seed |")
    print("|---|---|---|---|---|---|")
    for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98):
        flagged, hits, total = precision_recall([r.score > t for r in rows], rows)
        per_seed = []
        for seed in seeds:
            mine = [r for r in rows if r.seed == seed]
            per_seed.append(precision_recall([r.score > t for r in mine], mine))
        p = [h / f for f, h, _ in per_seed if f]
        rc = [h / n for _, h, n in per_seed if n]
        print(
            f"| {t} | {flagged:,} | {ratio(hits, flagged)} | {ratio(hits, total)} "
            f"| {min(p):.2f}-{max(p):.2f} | {min(rc):.2f}-{max(rc):.2f} |"
        )
    print()
    print("Whole ruleset: block if amount > 1000 or score > B; review if score > R or another rule")
    print()
    print("| B | R | block precision | block recall | flagged precision | flagged recall |")
    print("|---|---|---|---|---|---|")
    for block in (0.8, 0.9, 0.95):
        for review in (0.3, 0.4, 0.5, 0.6, 0.7):
            blocked = [r.other_block or r.score > block for r in rows]
            flagged = [
                b or r.other_review or r.score > review for b, r in zip(blocked, rows, strict=True)
            ]
            nb, hb, total = precision_recall(blocked, rows)
            nf, hf, _ = precision_recall(flagged, rows)
            print(
                f"| {block} | {review} | {ratio(hb, nb)} | {ratio(hb, total)} "
                f"| {ratio(hf, nf)} | {ratio(hf, total)} |"
            )
    print()
    print("By week of the stream (B 0.9, R 0.5): flagged precision / recall, frauds")
    print()
    print("| week | transactions | frauds | flagged precision | flagged recall |")
    print("|---|---|---|---|---|")
    for week in sorted({r.week for r in rows}):
        mine = [r for r in rows if r.week == week]
        flags = [r.other_block or r.other_review or r.score > 0.5 for r in mine]
        nf, hf, total = precision_recall(flags, mine)
        print(f"| {week} | {len(mine):,} | {total} | {ratio(hf, nf)} | {ratio(hf, total)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
