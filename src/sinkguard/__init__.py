"""sinkguard."""
