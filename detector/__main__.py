"""Command line of the detector: `python -m detector COMMAND ...` (see `--help`)."""

from detector.cli import main

raise SystemExit(main())
