"""Model names no loader can use fail at once, before torch loads: bad GGUF files, unknown names offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sinkguard.cli import main
from sinkguard.errors import SinkguardError
from sinkguard.models import _bundled_gguf, check_gguf, check_model, resolve

ROOT = Path(__file__).resolve().parents[1]


def _write_gguf(path: Path) -> Path:
    """A small GGUF (v3): metadata with a string array and two tensors of 256 bytes each."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("general.test", 3)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.add_tensor("q", np.ones((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_whole_gguf_passes_and_every_cut_of_it_is_refused(tmp_path):
    good = _write_gguf(tmp_path / "tiny.gguf")
    data = good.read_bytes()
    check_gguf(good)
    assert check_model(str(good)) == str(good)
    assert resolve(good) == (str(tmp_path), "tiny.gguf")
    cut = tmp_path / "cut.gguf"
    for size, message in ((len(data) - 1, f"tensors need {len(data)} bytes but the file has {len(data) - 1}"),
                          (300, "tensors need"), (40, "ends inside its header"), (6, "ends inside its header"),
                          (0, "GGUF magic")):
        cut.write_bytes(data[:size])
        with pytest.raises(SinkguardError, match=message):
            check_gguf(cut)


def test_not_a_gguf_and_unsupported_versions_are_refused(tmp_path):
    text = tmp_path / "x.gguf"
    text.write_text("hello, not a model\n")
    with pytest.raises(SinkguardError, match=r"x.gguf is not a valid GGUF file \(it does not start with the GGUF"):
        check_model(text)
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + b"\0" * 16)
    with pytest.raises(SinkguardError, match="GGUF version 1"):
        check_gguf(old)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(SinkguardError, match="is a file but not a .gguf model"):
        check_model(other)


def test_the_bundled_gguf_is_accepted_whole_and_refused_truncated(tmp_path):
    try:
        real = _bundled_gguf("smollm2-135m-instruct")
    except SinkguardError:
        pytest.skip("the bundled model package is not installed")
    check_gguf(real)
    cut = tmp_path / "cut.gguf"
    with real.open("rb") as fh:
        cut.write_bytes(fh.read(2 << 20))
    with pytest.raises(SinkguardError, match=f"the file has {2 << 20}"):
        check_gguf(cut)


def test_unknown_names_offline_and_folders_without_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SinkguardError, match=r"not a bundled alias \(smollm2-135m-instruct\).* hub is offline"):
        check_model("no-such-alias")
    with pytest.raises(SinkguardError, match="hub is offline"):
        check_model("someone/no-such-model")
    with pytest.raises(SinkguardError, match="directory without config.json"):
        check_model(tmp_path)
    with pytest.raises(SinkguardError, match="not found"):
        check_model(tmp_path / "missing" / "model")


@pytest.mark.parametrize("command", ["align", "finetune", "evaluate", "analyze"])
def test_every_model_flag_is_a_two_line_usage_error(command, tmp_path, capsys):
    bad = tmp_path / "x.gguf"
    bad.write_text("not a model")
    with pytest.raises(SystemExit) as exc:
        main([command, "--model", str(bad), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    usage, error = capsys.readouterr().err.strip().splitlines()
    assert usage == f"usage: sinkguard {command} [options] (see sinkguard {command} -h)"
    assert error.startswith(f"sinkguard {command}: error: argument --model: model file {bad} is not a valid GGUF")
    assert not (tmp_path / "o").exists()


def test_the_model_check_runs_before_torch_is_imported(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("not a model")
    code = ("import sys\nfrom sinkguard.cli import main\n"
            "try:\n    main(['finetune', '--model', sys.argv[1], '--out', sys.argv[2]])\n"
            "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bad), str(tmp_path / "o")], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr


def test_a_garbage_length_in_the_header_is_a_cut_not_a_huge_read(tmp_path):
    path = tmp_path / "garbage.gguf"
    # v3, 0 tensors, 1 metadata entry whose key claims 2**62 bytes
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
                     + (2 ** 62).to_bytes(8, "little") + b"key")
    with pytest.raises(SinkguardError, match="ends inside its header"):
        check_gguf(path)
