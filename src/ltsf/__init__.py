"""ltsf: exact CycleNet, SegRNN, DLinear and Linear/MLP forecasters, RCF as a plug-in, and the
standard LTSF benchmark protocol."""

from .checkpoint import CheckpointForecaster, load_checkpoint
from .config import RunConfig
from .data import (
    DATASET_KINDS,
    ForecastData,
    SeriesData,
    StandardScaler,
    WindowDataset,
    cycle_phase,
    default_data_root,
    load_benchmark,
    make_splits,
    read_series,
    split_borders,
)
from .errors import LTSFError
from .forecaster import Forecaster
from .models import MLP, MODELS, RCF, CycleNet, DLinear, Linear, RecurrentCycle, SegRNN
from .train import (
    build_model,
    count_parameters,
    load_run_model,
    lr_after_epoch,
    metrics,
    predict_windows,
    run,
    train_model,
)

__all__ = [
    "MLP", "RCF", "CheckpointForecaster", "DLinear", "load_checkpoint", "DATASET_KINDS", "MODELS", "CycleNet", "ForecastData", "Forecaster", "LTSFError", "Linear",
    "RecurrentCycle", "RunConfig", "SegRNN", "SeriesData", "StandardScaler", "WindowDataset",
    "build_model", "count_parameters", "cycle_phase", "default_data_root", "load_benchmark",
    "load_run_model", "lr_after_epoch", "make_splits", "metrics", "predict_windows",
    "read_series", "run", "split_borders", "train_model",
]
