"""Vanilla baselines: the KD objective by hand, and tiny end-to-end runs of methods.vanilla.run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ConfigError, VocabularyMismatchError
from core.losses import get_divergence
from core.objectives import word_level_kd_sum
from core.pipeline import run_method
from methods.vanilla.run import METHOD, VanillaConfig, main

TINY = ["--teacher-preset", "tiny", "--student", "tiny", "--teacher-steps", "40", "--steps", "30", "--eval-size", "16",
        "--train-size", "2000", "--batch-size", "16", "--warmup-steps", "3"]  # fmt: skip


def test_kd_objective_mixes_ce_and_divergence():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 2], [-100, 1, 6, -100, -100]])
    fkl = get_divergence("fkl")
    total, ce, kd = word_level_kd_sum(student, teacher, labels, fkl, kd_ratio=0.25)
    # Independent reference: position t predicts labels[t + 1]; 4 valid targets in all.
    s, t, y = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    valid = y != -100
    ref_ce = F.cross_entropy(s[valid], y[valid], reduction="sum")
    ref_kd = (F.softmax(t[valid], -1) * (F.log_softmax(t[valid], -1) - F.log_softmax(s[valid], -1))).sum()
    assert torch.allclose(ce, ref_ce) and torch.allclose(kd, ref_kd)
    assert torch.allclose(total, 0.75 * ref_ce + 0.25 * ref_kd)
    # kd_ratio 1 with the teacher equal to the student: nothing to learn.
    total, _, _ = word_level_kd_sum(student, student.clone(), labels, fkl, kd_ratio=1.0)
    assert total.abs().item() < 1e-12


def test_settings_are_range_checked():
    for bad in ({"kd_ratio": 1.5}, {"loss": "kl"}, {"variant": "distill"}, {"alpha": 1.0}, {"temperature": 0.0}):
        with pytest.raises(ConfigError):
            VanillaConfig(**bad)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_end_to_end_kd_run(tmp_path):
    out = tmp_path / "kd"
    metrics = main([*TINY, "--loss", "rkl", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved) >= {"method", "task", "seed", "eval", "train", "config", "env"}
    assert saved["method"] == "kd-rkl" and saved["task"] == "ops" and saved["seed"] == 0
    for who in ("student", "teacher", "sft_student"):
        ops = {f"exact_match/{op}" for op in ("add", "pair", "reverse", "sort")}
        assert set(saved["eval"][who]) == {"exact_match", "rougeL", "perplexity"} | ops
    assert {"steps", "tokens", "wall_s", "tokens_per_s", "peak_mem_mb"} <= set(saved["train"])
    assert saved["train"]["steps"] == 30 and saved["env"]["torch"] == torch.__version__
    log = _log(out)
    assert len(log) == 30 and sum(r["loss"] for r in log[-5:]) < sum(r["loss"] for r in log[:5])
    # The saved student reloads with plain transformers and generates.
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    ids = tokenizer("<s>sort: 3 1 2 =", return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert len((out / "samples.jsonl").read_text().splitlines()) == 16
    assert not (out / "checkpoints").exists()
    # Rerunning a complete run does not train again.
    again = main([*TINY, "--loss", "rkl", "--out", str(out)])
    assert again["train"] == saved["train"]


def test_sft_and_seqkd_variants(tmp_path):
    sft = main([*TINY, "--variant", "sft", "--out", str(tmp_path / "sft")])
    assert sft["method"] == "sft" and sft["eval"]["student"] == sft["eval"]["sft_student"]
    seqkd = main([*TINY, "--variant", "seqkd", "--out", str(tmp_path / "seqkd")])
    assert seqkd["method"] == "seqkd" and seqkd["train"]["steps"] == 30
    # SeqKD trains on the teacher's outputs: identical runs share the same SFT baseline and teacher.
    assert (
        seqkd["eval"]["sft_student"] == sft["eval"]["sft_student"]
        and seqkd["eval"]["teacher"] == sft["eval"]["teacher"]
    )


def test_student_with_another_vocabulary_points_to_dskd(tmp_path):
    from core.data import DataConfig, load_task
    from core.models import build_model
    from core.tokenizers import train_bpe

    task = load_task(DataConfig(train_size=200, eval_size=4))
    other = train_bpe([e.prompt + e.target for e in task.train] + ["zebra quokka"] * 50, 400)
    build_model("tiny", other, seed=0).save_pretrained(tmp_path / "other")
    with pytest.raises(VocabularyMismatchError, match="methods/dskd"):
        run_method(METHOD, [*TINY, "--student", str(tmp_path / "other"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "methods.vanilla.run", "--loss", "kl2", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: --loss must be one of fkl, rkl, jsd, tvd, skl, srkl" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_speed_paths_reach_the_run_and_match_the_plain_loss(tmp_path):
    """--fused is exact; --teacher-cache at k >= vocabulary size is exact up to its float16 storage of log-probs.
    Same data order, initialisation and teacher, so the first steps' losses must agree."""
    short = [*TINY, "--steps", "4", "--eval-size", "4"]
    plain = main([*short, "--fused", "false", "--out", str(tmp_path / "plain")])
    fused = main([*short, "--out", str(tmp_path / "fused")])  # the default: fused where the heads allow it
    cached = main([*short, "--teacher-cache", "--teacher-cache-k", "100000", "--out", str(tmp_path / "cached")])
    first = [r["loss"] for r in _log(tmp_path / "plain")]
    assert [r["loss"] for r in _log(tmp_path / "fused")] == pytest.approx(first, rel=1e-5)
    # float16 keeps ~3 significant digits of each log-prob: the KD sum agrees to about 1e-3 relative
    assert [r["loss"] for r in _log(tmp_path / "cached")] == pytest.approx(first, rel=3e-3)
    assert plain["train"]["kd_path"] == {"path": "plain"}
    assert fused["train"]["kd_path"] == {"path": "fused"}
    record = cached["train"]["kd_path"]
    assert record["path"] == "fused+cache(k=100000)"
    assert record["cache"]["hit_rate"] == 1.0 and record["cache"]["hits"] == 4 * 16  # 4 steps x 16 examples
    # k >= V: every vocabulary entry of every target token is stored (2-byte log-prob + 2-byte id) plus the tail
    (bytes_per_token,) = record["cache"]["bytes_per_token"]
    vocab = len(AutoTokenizer.from_pretrained(tmp_path / "plain" / "student"))
    assert bytes_per_token >= 4 * vocab
    # a second run with another seed reuses the cache (same teacher and data): no rebuild, same folder
    again = main(
        [*short, "--teacher-cache", "--teacher-cache-k", "100000", "--seed", "1", "--out", str(tmp_path / "c1")]
    )
    assert again["train"]["kd_path"]["cache"]["folders"] == record["cache"]["folders"]
