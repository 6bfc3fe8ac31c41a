"""Simulated payment traffic for the fraud detector, and a watcher of its verdicts.

`python -m publisher simulate|republish|watch --help` for the command line;
`publisher.simulate.generate(config)` / `records(config)` for the Python API, and
`publisher.report.Tally` for the figures of a stream of verdicts (what `watch` reports).
"""
