"""Arguments shared by several sub-commands."""

from __future__ import annotations

import argparse


def add_data_root(parser: argparse.ArgumentParser) -> None:
    """`--data-root`: overrides env SINKGUARD_DATA and the default ../shared/data."""
    parser.add_argument(
        "--data-root", default=None,
        help="data folder holding hft/ (default: env SINKGUARD_DATA, else ../shared/data)",
    )


def add_model(parser: argparse.ArgumentParser, default: str | None = "smollm2-135m-instruct") -> None:
    """`--model`: hub id, local directory, .gguf file or bundled alias."""
    parser.add_argument(
        "--model", default=default, required=default is None,
        help="hub id, local directory, .gguf file or bundled alias (default: %(default)s)",
    )
