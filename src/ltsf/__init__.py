"""ltsf."""
