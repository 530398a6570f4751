"""Speech tasks: the synthetic default, the FSDD loader (speaker split), the fairseq S2T manifest loader (wav,
npy, zip byte ranges; errors naming file and line), voiced Multi30k's refusal without espeak-ng, tokenization,
and the model's batches, label-smoothed CE and greedy decoding."""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from core.errors import DataError
from speech import data as sd
from speech.models import (
    IGNORE_INDEX,
    build_model,
    collate,
    decoder_states,
    label_smoothed_nll,
    make_feature,
    translate,
)
from tests.conftest import shared_data


def write_wav(path, seconds=0.3, rate=8000, freq=440.0):
    t = np.arange(int(rate * seconds)) / rate
    wavfile.write(path, rate, (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16))


def test_synthetic_task_is_deterministic_and_word_aligned():
    a, b = sd.synthetic_task(20, 5), sd.synthetic_task(20, 5)
    assert [u.target for u in a.train] == [u.target for u in b.train]
    audio_a, rate = a.train[3].load()
    audio_b, _ = b.train[3].load()
    np.testing.assert_array_equal(audio_a, audio_b)
    assert rate == sd.SAMPLE_RATE and audio_a.dtype == np.float32
    german = {g: e for e, g, _ in sd.SYNTH_WORDS}
    for u in a.train + a.eval:
        assert [german[w] for w in u.target.split()] == u.source.split()
        assert 2 <= len(u.target.split()) <= 5


def test_fsdd_split_by_speaker(tmp_path):
    for speaker in ("alice", "bob", "carol"):
        for digit in range(10):
            write_wav(tmp_path / f"{digit}_{speaker}_0.wav", freq=200 + 50 * digit)
    task = sd.digits_task(tmp_path, n_train=30, n_eval=10, test_speakers=("carol",))
    assert {u.speaker for u in task.eval} == {"carol"}
    assert "carol" not in {u.speaker for u in task.train}
    for u in task.train[:5]:
        words = u.target.split()
        assert 2 <= len(words) <= 6 and all(w in sd.GERMAN_DIGITS for w in words)
        assert [sd.GERMAN_DIGITS.index(w) for w in words] == [sd.ENGLISH_DIGITS.index(w) for w in u.source.split()]
        audio, rate = u.load()
        # each 0.3 s recording at 8 kHz becomes 4800 samples at 16 kHz, plus 50-150 ms of silence after it
        assert rate == 16000 and len(words) * 4800 + len(words) * 800 <= len(audio) <= len(words) * (4800 + 2400)


def test_fsdd_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sd.digits_task(tmp_path / "missing")
    write_wav(tmp_path / "3_alice_0.wav")
    with pytest.raises(DataError, match="not in"):
        sd.digits_task(tmp_path, test_speakers=("zed",))
    with pytest.raises(DataError, match="no speaker for training"):
        sd.digits_task(tmp_path, test_speakers=("alice",))
    write_wav(tmp_path / "three_alice.wav")
    with pytest.raises(DataError, match="three_alice.wav"):
        sd.fsdd_index(tmp_path)


def test_real_fsdd_loads():
    folder = shared_data("fsdd/recordings")
    task = sd.digits_task(folder, n_train=5, n_eval=2)
    assert {u.speaker for u in task.eval} == {"theo"}
    audio, rate = task.train[0].load()
    assert rate == 16000 and 0.3 * 16000 * 2 < len(audio) < 16000 * 12


def test_s2t_manifest_wav_npy_and_zip(tmp_path):
    write_wav(tmp_path / "a.wav", seconds=0.5, rate=16000)
    np.save(tmp_path / "b.npy", np.ones((7, 40), np.float32))
    buffer = io.BytesIO()
    write_wav(buffer, seconds=0.25, rate=16000)
    wav_bytes = buffer.getvalue()
    with zipfile.ZipFile(tmp_path / "fbank.zip", "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("c.wav", wav_bytes)
    with zipfile.ZipFile(tmp_path / "fbank.zip") as zf:
        info = zf.getinfo("c.wav")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra)  # local header is 30 bytes + name
    (tmp_path / "train_st.tsv").write_text(
        "id\taudio\tn_frames\ttgt_text\tspeaker\n"
        "u1\ta.wav\t8000\tein Hund\tspk1\n"
        "u2\tb.npy\t7\tzwei Katzen\tspk2\n"
        f"u3\tfbank.zip:{offset}:{len(wav_bytes)}\t4000\tdrei\tspk1\n"
    )
    utts = sd.read_s2t_manifest(tmp_path / "train_st.tsv")
    assert [u.target for u in utts] == ["ein Hund", "zwei Katzen", "drei"]
    audio, rate = utts[0].load()
    assert rate == 16000 and len(audio) == 8000
    feats, rate = utts[1].load()
    assert rate == 0 and feats.shape == (7, 40)
    audio, rate = utts[2].load()
    assert rate == 16000 and len(audio) == 4000
    assert len(sd.read_s2t_manifest(tmp_path / "train_st.tsv", limit=2)) == 2


def test_s2t_manifest_errors_name_file_and_line(tmp_path):
    bad_header = tmp_path / "h.tsv"
    bad_header.write_text("id\taudio\ttgt_text\nu1\ta.wav\thallo\n")
    with pytest.raises(DataError, match=r"h.tsv, line 1: .*n_frames"):
        sd.read_s2t_manifest(bad_header)
    short_row = tmp_path / "r.tsv"
    short_row.write_text("id\taudio\tn_frames\ttgt_text\nu1\ta.wav\t10\thallo\nu2\tb.wav\n")
    with pytest.raises(DataError, match=r"r.tsv, line 3"):
        sd.read_s2t_manifest(short_row)
    missing_audio = tmp_path / "m.tsv"
    missing_audio.write_text("id\taudio\tn_frames\ttgt_text\nu1\tnothere.wav\t10\thallo\n")
    utts = sd.read_s2t_manifest(missing_audio)
    with pytest.raises(DataError, match=r"m.tsv, line 2: .*nothere.wav"):
        utts[0].load()
    with pytest.raises(DataError, match="does not exist"):
        sd.read_s2t_manifest(tmp_path / "absent.tsv")


def test_multi30k_without_espeak_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="espeak-ng"):
        sd.multi30k_task(tmp_path, tmp_path / "cache")


def test_voiced_multi30k_when_espeak_is_installed(tmp_path):
    if sd.shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); voiced Multi30k is skipped")
    task = sd.multi30k_task(shared_data("multi30k"), tmp_path / "espeak", n_train=2, n_eval=1)
    audio, rate = task.train[0].load()
    assert rate == 16000 and len(audio) > 16000 * 0.5


def test_target_vocab_word_and_bpe():
    vocab = sd.TargetVocab(words=["zwei", "drei", "zwei"])
    assert len(vocab) == 6 and vocab.decode([1, *vocab.encode("zwei drei"), 2, 0]) == "zwei drei"
    assert vocab.encode("vier") == [3]  # unknown word
    from core.tokenizers import train_bpe

    bpe = sd.TargetVocab(bpe=train_bpe(["ein Hund läuft", "zwei Katzen schlafen"] * 5, vocab_size=300))
    ids = bpe.encode("ein Hund schläft")
    assert min(ids) > 2 and bpe.decode([1, *ids, 2]) == "ein Hund schläft"


def test_label_smoothed_ce_by_hand():
    # V = 3, uniform logits: -log p = ln 3 for every token, so with eps = 0.3, eps_i = 0.15:
    #   loss = (1 - 0.3 - 0.15) ln 3 + 0.15 * 3 ln 3 = ln 3; and eps = 0 gives the plain NLL
    logits = torch.zeros(1, 2, 3)
    labels = torch.tensor([[1, IGNORE_INDEX]])
    loss = label_smoothed_nll(logits, labels, 0.3)
    assert loss[0, 0].item() == pytest.approx(math.log(3)) and loss[0, 1].item() == 0.0
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    nll = -torch.log_softmax(logits, -1)[0, 0]
    assert label_smoothed_nll(logits, torch.tensor([[0]]), 0.0).item() == pytest.approx(nll[0].item())
    smoothed = (1 - 0.2 - 0.1) * nll[0] + 0.1 * nll.sum()
    assert label_smoothed_nll(logits, torch.tensor([[0]]), 0.2).item() == pytest.approx(smoothed.item())


def test_batches_states_and_greedy_decoding():
    vocab = sd.TargetVocab(words=["a", "b", "c"])
    feats = [torch.randn(40, 16), torch.randn(25, 16)]
    rows = [make_feature(feats[0], vocab.encode("a b c"), vocab), make_feature(feats[1], vocab.encode("b"), vocab)]
    batch = collate(rows)
    assert batch["input_features"].shape == (2, 40, 16) and batch["attention_mask"][1].sum() == 25
    assert batch["decoder_input_ids"][1].tolist() == [1, vocab.stoi["b"], 0, 0]
    assert batch["labels"][1].tolist() == [vocab.stoi["b"], 2, IGNORE_INDEX, IGNORE_INDEX]
    model = build_model("tiny", len(vocab), 16, seed=0)
    keys, values = decoder_states(model, rows)
    assert keys.shape == (4 + 2, 64) and values.tolist() == [*rows[0]["labels"].tolist(), *rows[1]["labels"].tolist()]
    # the same seed gives the same initialisation
    torch.testing.assert_close(model.lm_head.weight, build_model("tiny", len(vocab), 16, seed=0).lm_head.weight)
    texts = translate(model, feats, vocab, max_new_tokens=4)
    assert len(texts) == 2 and all(set(t.split()) <= {"a", "b", "c"} for t in texts)
