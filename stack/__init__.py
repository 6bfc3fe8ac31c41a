"""A local stack for development and demos: the Pub/Sub emulator, redis-server and the functions."""
