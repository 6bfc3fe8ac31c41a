"""Helpers shared by the tests: Pub/Sub, state streams, simulations, function servers."""
