"""Real-time fraud screening for Google Cloud Pub/Sub: the detection core and its functions."""
