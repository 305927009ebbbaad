"""`sinkguard defenses [--json]`: every registered defense, its stage, paper, code and options."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def register(sub) -> None:
    p = sub.add_parser("defenses", help="list the registered defenses with their stages and options",
                       description="Each (defense, stage): paper, official repository, whether it follows the "
                       "official code or the paper only, and its options with their defaults.")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=run)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def options(config_cls: type) -> list[dict]:
    """The method's own options: the config fields that plain TrainingArguments does not have."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [{"name": f.name, "default": _default(f), "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(config_cls) if f.name not in base and not f.name.startswith("_")]


def describe() -> list[dict]:
    """One record per registered (name, stage), in flow order."""
    from ..defenses import registered

    return [{"name": d.name, "stage": d.stage, "description": d.description, "paper": d.paper,
             "official_code": d.official_code, "fidelity": d.fidelity, "module": d.config_cls.__module__,
             "options": options(d.config_cls)} for d in registered()]


def run(args: argparse.Namespace) -> int:
    records = describe()
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0
    for r in records:
        print(f"{r['name']}  [{r['stage']}]  {r['fidelity']}"
              + (f" ({r['official_code']})" if r["official_code"] else ""))
        if r["description"]:
            print(f"  {r['description']}")
        if r["paper"]:
            print(f"  paper: {r['paper']}")
        for o in r["options"]:
            print(f"    {o['name']} = {o['default']!r}" + (f"  # {o['help']}" if o["help"] else ""))
    return 0
