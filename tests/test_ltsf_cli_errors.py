"""Every user mistake of issue 11 (ltsf part) ends in one `ltsf: error:` line and exit code 2."""

from __future__ import annotations

import pytest

from ltsf import LTSFError, RunConfig
from ltsf.cli import main


def _files(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"mse": "d\xe9j\xe0"}'.encode("latin-1"))
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "results.json").write_text('{"model": "CycleNet", "mse": 0.3')
    (tmp_path / "keyless").mkdir()
    (tmp_path / "keyless" / "results.json").write_text('{"mse": 0.3}')
    (tmp_path / "scalar.yaml").write_text("experiments:\n  - model: CycleNet\n    grid: {pred_len: 96}\n")
    (tmp_path / "latin1.yaml").write_bytes("model: Cycl\xe9Net\n".encode("latin-1"))
    (tmp_path / "bad.pth").write_bytes(b"PK\x03\x04 not a zip")
    return tmp_path


CASES = [
    (["train", "--model", "SegRNN", "--d_model", "511"], "must be even"),
    (["train", "--pct_start", "1.5"], "--pct_start must be strictly between 0 and 1"),
    (["train", "--pct_start", "0"], "--pct_start must be strictly between 0 and 1"),
    (["train", "--learning_rate", "nan"], "--learning_rate must be a positive finite number"),
    (["train", "--learning_rate", "inf"], "--learning_rate must be a positive finite number"),
    (["train", "--learning_rate", "-0.1"], "--learning_rate must be a positive finite number"),
    (["train", "--num_threads", "-1"], "--num_threads must be >= 0"),
    (["train", "--use_revin", "2"], "--use_revin must be 0 or 1"),
    (["train", "--use_revin", "yes"], "invalid int value: 'yes'"),
    (["train", "--rcf", "3"], "--rcf must be 0 or 1"),
    (["train", "--model", "CycleNet", "--rcf", "0"], "cannot drop it"),
    (["train", "--cycle", "0"], "--cycle must be a positive integer"),
    (["train", "--batch_size", "0"], "--batch_size must be a positive integer"),
    (["train", "--dropout", "1.0"], "--dropout must be in [0, 1)"),
    (["train", "--data", "custom", "--data_path", "x.csv"], "no default cycle length"),
    (["train", "--tag", "../up"], "must not contain '/'"),
    (["train", "--config", "{tmp}/latin1.yaml"], "not UTF-8"),
    (["grid", "{tmp}/scalar.yaml"], "grid key 'pred_len' needs a non-empty list"),
    (["table", "{tmp}/latin1.json"], "is not UTF-8 text"),
    (["table", "{tmp}/trunc"], "is not valid JSON (truncated?"),
    (["table", "{tmp}/keyless"], "lacks model, data, seq_len, pred_len, mae, random_seed"),
    (["predict", "--run", "{tmp}/trunc", "--out", "{tmp}/o"], "is not valid JSON (truncated?"),
    (["predict", "--checkpoint", "{tmp}/bad.pth", "--data", "{tmp}/latin1.json", "--out", "{tmp}/o"],
     "not a readable state-dict checkpoint"),
]


@pytest.mark.parametrize("argv, match", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_is_one_line_exit_2(argv, match, tmp_path, capsys):
    _files(tmp_path)
    code = None
    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as exc:  # argparse errors: usage line + one error line, exit 2
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert match in err[-1] and err[-1].startswith("ltsf") and len(err) <= 2
    assert len(err) == 1 or err[0].startswith("usage:")


def test_models_raise_ltsf_error_for_user_mistakes():
    from ltsf import CycleNet, DLinear, SegRNN

    with pytest.raises(LTSFError):
        CycleNet(96, 96, 7, 24, model_type="rnn")
    with pytest.raises(LTSFError):
        SegRNN(96, 96, 7, seg_len=50)
    with pytest.raises(LTSFError):
        SegRNN(96, 96, 7, seg_len=24, d_model=7)
    with pytest.raises(LTSFError):
        DLinear(96, 96, 7, kernel_size=24)
    with pytest.raises(LTSFError, match="must be an integer"):
        RunConfig(seq_len="96").validate()
    with pytest.raises(LTSFError, match="must be a number"):
        RunConfig(learning_rate="fast").validate()
