"""Sub-commands of the `sinkguard` CLI, one module each (see `sinkguard.cli`)."""
