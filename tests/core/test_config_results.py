"""The command-line convention and the run folder."""

import json
import os

import pytest

from core.config import ModelConfig, RunConfig, parse
from core.data import DataConfig
from core.errors import ConfigError, OutputDirError
from core.io import atomic_dir, atomic_write_json
from core.results import format_table, prepare_run_dir
from core.train import TrainConfig


def test_dash_and_underscore_flags_and_types():
    data, train = parse((DataConfig, TrainConfig), ["--eval-size", "7", "--grad_accum", "2", "--lr", "0.5"])
    assert data.eval_size == 7 and train.grad_accum == 2 and train.lr == 0.5


def test_unknown_flag_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown argument.*--learning-rate"):
        parse((TrainConfig,), ["--learning-rate", "1"])


def test_out_of_range_settings_are_config_errors():
    with pytest.raises(ConfigError, match="--device"):
        parse((RunConfig,), ["--device", "tpu"])
    with pytest.raises(ConfigError, match="--vocab-size"):
        ModelConfig(vocab_size=10)


def test_run_dir_refuses_another_configuration(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, {"TrainConfig": {"steps": 10, "stop_after": None}}, overwrite=False)
    # Same settings (a volatile one changed): accepted for resume.
    prepare_run_dir(out, {"TrainConfig": {"steps": 10, "stop_after": 3}}, overwrite=False)
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a step completed (an empty folder is reused)
    with pytest.raises(OutputDirError, match="different configuration.*--overwrite"):
        prepare_run_dir(out, {"TrainConfig": {"steps": 20, "stop_after": None}}, overwrite=False)
    prepare_run_dir(out, {"TrainConfig": {"steps": 20, "stop_after": None}}, overwrite=True)
    assert json.loads((out / "config.json").read_text())["TrainConfig"]["steps"] == 20


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(OutputDirError, match="cannot write"):
        prepare_run_dir(locked / "run", {}, overwrite=False)


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="cannot write to the output folder"):
        prepare_run_dir(tmp_path / "file" / "run", {}, overwrite=False)


def test_atomic_dir_keeps_the_old_version_on_failure(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        atomic_write_json(tmp / "state.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        atomic_write_json(tmp / "state.json", {"v": 2})
        raise RuntimeError("killed mid-write")
    assert json.loads((final / "state.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_format_table():
    text = format_table([("teacher", {"em": 98.0}), ("student", {"em": 24.5})], ["em", "bleu"])
    assert text.splitlines()[0].split() == ["model", "em", "bleu"]
    assert text.splitlines()[3].split() == ["student", "24.50", "-"]
