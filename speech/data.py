"""Speech translation tasks: audio in one language -> text in another.

    synthetic   the embedded default: words rendered as distinct two-tone patterns (a made-up "spoken" English),
                paired with German words; generated in-process from a fixed seed, no files, no external program
    digits      real recordings of the Free Spoken Digit Dataset (../shared/data/fsdd/recordings), concatenated
                into utterances of 2 to 6 digits; target: the digits as German number words; split by speaker
    multi30k    English sentences of ../shared/data/multi30k spoken by espeak-ng; target: the German side
    s2t         any corpus in fairseq's speech-to-text layout (a tsv manifest per split + audio), e.g. MuST-C,
                or a plain audio<TAB>text list per split; wav or FLAC at any rate, resampled to 16 kHz

An utterance carries its audio lazily (`load()`), so a task of thousands of utterances costs memory only for the
features computed from it (speech/features.py). Text is tokenized by a `TargetVocab`: a word-level vocabulary
for the closed digit and synthetic vocabularies, a byte-level BPE (core.tokenizers) for open text.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.io import wavfile

from core.errors import DataError

SAMPLE_RATE = 16_000  # every waveform a task hands out is mono float32 at this rate (features expect it)

GERMAN_DIGITS = ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun")
ENGLISH_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# The synthetic language: 12 English words, each "spoken" as two tones (Hz) of its own, and their German words.
SYNTH_WORDS = (
    ("red", "rot", (300, 900)),
    ("blue", "blau", (300, 1500)),
    ("cat", "katze", (450, 1200)),
    ("dog", "hund", (450, 2100)),
    ("big", "groß", (600, 1800)),
    ("small", "klein", (600, 2700)),
    ("house", "haus", (750, 1050)),
    ("tree", "baum", (750, 2400)),
    ("sun", "sonne", (900, 3000)),
    ("moon", "mond", (1050, 1650)),
    ("water", "wasser", (1200, 3300)),
    ("bird", "vogel", (1350, 2250)),
)


@dataclass
class Utterance:
    """One example. `load()` returns (array, sample_rate): a mono waveform in [-1, 1], or, with sample_rate 0, an
    already computed (frames, mel bins) filterbank matrix (fairseq manifests may point at .npy features)."""

    id: str
    source: str  # the transcript (unused in training: DNKD needs none); "" when unknown
    target: str  # the translation
    speaker: str
    load: Callable[[], tuple[np.ndarray, int]]


@dataclass
class SpeechTask:
    name: str  # benchmark task name
    train: list[Utterance]
    eval: list[Utterance]
    word_level: bool  # True: a closed vocabulary (word-level TargetVocab); False: train a BPE on the targets


# -- tokenization of the targets -------------------------------------------------------------------------------


class TargetVocab:
    """Target-side tokenizer: pad 0, bos 1, eos 2; `encode` adds no specials, `decode` drops them."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, words: Sequence[str] | None = None, bpe=None) -> None:
        if (words is None) == (bpe is None):
            raise ValueError("TargetVocab takes either a word list or a BPE tokenizer")
        self.bpe = bpe
        if words is not None:
            self.itos = ["<pad>", "<s>", "</s>", "<unk>", *sorted(set(words))]
            self.stoi = {w: i for i, w in enumerate(self.itos)}
        else:
            assert bpe.pad_token_id == 0 and bpe.bos_token_id == 1 and bpe.eos_token_id == 2  # core.tokenizers order

    @classmethod
    def for_task(cls, task: SpeechTask, vocab_size: int = 1000) -> TargetVocab:
        if task.word_level:
            return cls(words=[w for u in task.train for w in u.target.split()])
        from core.tokenizers import train_bpe

        return cls(bpe=train_bpe([u.target for u in task.train], vocab_size=vocab_size))

    def __len__(self) -> int:
        return len(self.itos) if self.bpe is None else len(self.bpe)

    def encode(self, text: str) -> list[int]:
        if self.bpe is not None:
            return self.bpe.encode(text, add_special_tokens=False)
        return [self.stoi.get(w, 3) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) > 2]  # drop pad, bos, eos
        if self.bpe is not None:
            return self.bpe.decode(ids, skip_special_tokens=True).strip()
        return " ".join(self.itos[i] for i in ids if i < len(self.itos))


# -- audio helpers ---------------------------------------------------------------------------------------------


AUDIO_SUFFIXES = (".wav", ".flac", ".npy")


def read_wav(path: Path | str, data: bytes | None = None) -> tuple[np.ndarray, int]:
    """A wav file (or its bytes) as mono float32 in [-1, 1] and its sample rate. A file cut short (its header
    promises more samples than it holds) is refused: training on the clipped audio would be silent damage."""
    import struct
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", wavfile.WavFileWarning)
            rate, audio = wavfile.read(io.BytesIO(data) if data is not None else str(path))
    except (OSError, ValueError, EOFError, struct.error, IndexError) as exc:
        said = str(exc) or type(exc).__name__
        raise DataError(f"cannot read the wav file {path}: {said} (is it cut short or not a wav?)") from exc
    for warning in caught:
        if "prematurely" in str(warning.message) or "EOF" in str(warning.message):
            raise DataError(
                f"the wav file {path} is cut short ({warning.message}); replace it with a complete file or drop it "
                "from the manifest"
            )
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if np.issubdtype(audio.dtype, np.integer):
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max + 1)
    return audio.astype(np.float32), int(rate)


def read_flac(path: Path | str) -> tuple[np.ndarray, int]:
    """A FLAC file as mono float32 in [-1, 1] and its sample rate, through soundfile (libsndfile)."""
    try:
        import soundfile
    except ImportError:
        raise DataError(
            f"{path} is FLAC, which needs the soundfile package: pip install soundfile (or convert it to wav)"
        ) from None
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, EOFError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        said = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read the FLAC file {path}: {said}") from exc
    return audio.mean(axis=1).astype(np.float32), int(rate)


def read_audio(path: Path | str) -> tuple[np.ndarray, int]:
    """A wav or FLAC file (by its suffix) as mono float32 and its sample rate."""
    return read_flac(path) if Path(path).suffix.lower() == ".flac" else read_wav(path)


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy) to `target` Hz."""
    if rate == target:
        return audio.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


# -- the synthetic default -------------------------------------------------------------------------------------


def synth_word(tones: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Two tone segments of 80-120 ms each, frequencies jittered by +-3 %, random loudness, a smooth envelope."""
    parts = []
    for freq in tones:
        n = int(SAMPLE_RATE * rng.uniform(0.08, 0.12))
        t = np.arange(n) / SAMPLE_RATE
        f = freq * rng.uniform(0.97, 1.03)
        parts.append(rng.uniform(0.3, 0.8) * np.sin(2 * np.pi * f * t) * np.hanning(n))
    return np.concatenate(parts)


def synth_utterance(word_ids: Sequence[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pieces = [np.zeros(int(SAMPLE_RATE * rng.uniform(0.02, 0.06)))]
    for w in word_ids:
        pieces += [synth_word(SYNTH_WORDS[w][2], rng), np.zeros(int(SAMPLE_RATE * rng.uniform(0.03, 0.08)))]
    audio = np.concatenate(pieces)
    return (audio + 0.02 * rng.standard_normal(len(audio))).astype(np.float32)


def synthetic_task(n_train: int = 1200, n_eval: int = 200, min_words: int = 2, max_words: int = 5) -> SpeechTask:
    """The embedded default: fixed by seed 1234 (the run's seed varies only the model), no files."""
    rng = random.Random(1234)

    def make(i: int, split: str) -> Utterance:
        words = [rng.randrange(len(SYNTH_WORDS)) for _ in range(rng.randint(min_words, max_words))]
        seed = hash_seed(split, i)
        return Utterance(
            id=f"synth-{split}-{i}",
            source=" ".join(SYNTH_WORDS[w][0] for w in words),
            target=" ".join(SYNTH_WORDS[w][1] for w in words),
            speaker="synth",
            load=lambda words=words, seed=seed: (synth_utterance(words, seed), SAMPLE_RATE),
        )

    train = [make(i, "train") for i in range(n_train)]
    evals = [make(i, "eval") for i in range(n_eval)]
    return SpeechTask("synthetic-speech", train, evals, word_level=True)


def hash_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


# -- spoken digits (FSDD) --------------------------------------------------------------------------------------

FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")


def fsdd_index(folder: Path) -> dict[str, list[tuple[int, Path]]]:
    """speaker -> [(digit, file)], from the file names `{digit}_{speaker}_{index}.wav`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"FSDD folder {folder} does not exist; pass --data-dir pointing at free-spoken-digit-dataset/recordings"
        )
    by_speaker: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(folder.glob("*.wav")):
        match = FSDD_NAME.match(path.name)
        if match is None:
            raise DataError(f"{path}: an FSDD file name must look like <digit>_<speaker>_<index>.wav")
        by_speaker.setdefault(match.group(2), []).append((int(match.group(1)), path))
    if not by_speaker:
        raise DataError(f"FSDD folder {folder} holds no .wav recordings")
    return by_speaker


def digits_task(
    folder: Path | str,
    n_train: int = 1500,
    n_eval: int = 300,
    test_speakers: Sequence[str] = ("theo",),
    min_digits: int = 2,
    max_digits: int = 6,
) -> SpeechTask:
    """Utterances of 2-6 recorded digits of one speaker each, joined by 50-150 ms of silence; train speakers and
    test speakers are disjoint, so the evaluation is on voices the model never heard."""
    index = fsdd_index(Path(folder))
    unknown = [s for s in test_speakers if s not in index]
    if unknown:
        raise DataError(f"--test-speakers {unknown} are not in {folder}; its speakers are {', '.join(sorted(index))}")
    train_speakers = [s for s in sorted(index) if s not in test_speakers]
    if not train_speakers:
        raise DataError("--test-speakers leaves no speaker for training")
    rng = random.Random(1234)

    def make(i: int, split: str, speakers: list[str]) -> Utterance:
        speaker = rng.choice(speakers)
        picks = [rng.choice(index[speaker]) for _ in range(rng.randint(min_digits, max_digits))]
        seed = hash_seed(split, i)
        return Utterance(
            id=f"fsdd-{split}-{i}",
            source=" ".join(ENGLISH_DIGITS[d] for d, _ in picks),
            target=" ".join(GERMAN_DIGITS[d] for d, _ in picks),
            speaker=speaker,
            load=lambda picks=picks, seed=seed: (join_recordings([p for _, p in picks], seed), SAMPLE_RATE),
        )

    train = [make(i, "train", train_speakers) for i in range(n_train)]
    evals = [make(i, "eval", list(test_speakers)) for i in range(n_eval)]
    return SpeechTask("spoken-digits", train, evals, word_level=True)


def join_recordings(paths: Sequence[Path], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pieces = []
    for path in paths:
        audio, rate = read_wav(path)
        pieces += [resample(audio, rate), np.zeros(int(SAMPLE_RATE * rng.uniform(0.05, 0.15)), np.float32)]
    return np.concatenate(pieces)


# -- voiced Multi30k (espeak-ng) -------------------------------------------------------------------------------


def espeak_binary() -> str:
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise DataError(
            "--task multi30k needs the espeak-ng program to voice the English sentences, and it is not on PATH; "
            "install the Debian package (apt-get install espeak-ng) or choose --task digits or --task synthetic"
        )
    return binary


def espeak(text: str, cache: Path) -> tuple[np.ndarray, int]:
    """English speech for `text` from espeak-ng, cached as a wav named by the text's hash."""
    cache.mkdir(parents=True, exist_ok=True)
    wav = cache / (hashlib.sha256(text.encode()).hexdigest()[:20] + ".wav")
    if not wav.is_file():
        tmp = wav.with_suffix(".tmp.wav")
        try:
            subprocess.run([espeak_binary(), "-v", "en-us", "-w", str(tmp), text], check=True, capture_output=True)
        except subprocess.CalledProcessError as exc:
            raise DataError(f"espeak-ng failed on {text!r}: {exc.stderr.decode(errors='replace')[:200]}") from exc
        tmp.replace(wav)
    audio, rate = read_wav(wav)
    return resample(audio, rate), SAMPLE_RATE


def multi30k_task(folder: Path | str, cache: Path, n_train: int = 2000, n_eval: int = 200) -> SpeechTask:
    """English captions (train.en / test_2016_flickr.en) voiced by espeak-ng, German captions as targets."""
    espeak_binary()  # refuse early, before reading anything
    folder = Path(folder)

    def lines(name: str) -> list[str]:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} does not exist; pass --data-dir pointing at the multi30k folder")
        return path.read_text(encoding="utf-8").splitlines()

    def split(prefix: str, n: int) -> list[Utterance]:
        en, de = lines(prefix + ".en"), lines(prefix + ".de")
        if len(en) != len(de):
            raise DataError(f"{folder}/{prefix}.en has {len(en)} lines but {prefix}.de has {len(de)}")
        return [
            Utterance(f"m30k-{prefix}-{i}", e, d, "espeak", lambda e=e: espeak(e, cache))
            for i, (e, d) in enumerate(zip(en[:n], de[:n]))
        ]

    return SpeechTask("voiced-multi30k", split("train", n_train), split("test_2016_flickr", n_eval), word_level=False)


# -- fairseq speech-to-text manifests (MuST-C and others) ------------------------------------------------------

S2T_COLUMNS = ("id", "audio", "n_frames", "tgt_text")


def read_s2t_manifest(path: Path | str, limit: int | None = None) -> list[Utterance]:
    """A fairseq S2T tsv: header with at least id, audio, n_frames, tgt_text (src_text, speaker optional); or a
    plain list without header, one `audio<TAB>text` line per utterance.

    `audio` is a path relative to the manifest's folder: a .wav or .flac file (any sample rate, resampled to
    16 kHz), a .npy filterbank, or a byte range `archive.zip:offset:length` of a wav or npy stored uncompressed in
    a zip (how fairseq's MuST-C recipe stores its features)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist; pass --data-dir and --train-split/--eval-split")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"manifest {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc
    lines = text.splitlines()
    first = lines[0] if lines else ""
    if not first.strip():
        raise DataError(f"manifest {path} is empty (line 1 holds no header); fairseq S2T needs {S2T_COLUMNS}")
    header = first.split("\t")
    if not set(S2T_COLUMNS) <= set(header):
        if "\t" not in first and set(S2T_COLUMNS) <= set(first.split()):
            raise DataError(
                f"{path}, line 1: the columns are separated by spaces; a manifest's separator is a tab (\\t)"
            )
        audio_like = Path(header[0]).suffix.lower() in AUDIO_SUFFIXES or _is_byte_range(header[0])
        if len(header) == 2 and audio_like:
            return _read_plain_list(path, lines, limit)
        missing = [c for c in S2T_COLUMNS if c not in header]
        raise DataError(
            f"{path}, line 1: the header lacks the column(s) {missing}; fairseq S2T needs {S2T_COLUMNS} separated "
            "by tabs, or give a plain list of audio<TAB>text lines"
        )
    root = path.parent
    out: list[Utterance] = []
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    for line, row in enumerate(reader, start=2):
        if None in row or any(row.get(c) is None for c in S2T_COLUMNS):
            raise DataError(f"{path}, line {line}: expected {len(reader.fieldnames)} tab-separated fields")
        if not row["tgt_text"].strip():
            raise DataError(f"{path}, line {line}: tgt_text is empty")
        spec = row["audio"]
        out.append(
            Utterance(
                row["id"],
                row.get("src_text") or "",
                row["tgt_text"],
                row.get("speaker") or "",
                lambda spec=spec, line=line: load_s2t_audio(root, spec, f"{path}, line {line}"),
            )
        )
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"manifest {path} holds no utterances")
    return out


def _is_byte_range(spec: str) -> bool:
    parts = spec.split(":")
    return len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit()


def _read_plain_list(path: Path, lines: list[str], limit: int | None) -> list[Utterance]:
    """`audio<TAB>text` per line, no header: the id is the audio path, the speaker unknown."""
    root, out = path.parent, []
    for line, entry in enumerate(lines, start=1):
        if not entry.strip():
            continue
        fields = entry.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(f"{path}, line {line}: expected audio<TAB>text (two tab-separated fields, neither empty)")
        spec, target = fields[0].strip(), fields[1].strip()
        out.append(
            Utterance(
                spec, "", target, "", lambda spec=spec, line=line: load_s2t_audio(root, spec, f"{path}, line {line}")
            )
        )
        if limit is not None and len(out) >= limit:
            break
    return out


def load_s2t_audio(root: Path, spec: str, where: str) -> tuple[np.ndarray, int]:
    parts = spec.split(":")
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        archive, offset, length = root / parts[0], int(parts[1]), int(parts[2])
        if not archive.is_file():
            raise DataError(f"{where}: the archive {archive} does not exist")
        if not zipfile.is_zipfile(archive):
            raise DataError(f"{where}: {archive} is not a zip file")
        with archive.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        if data[:4] == b"RIFF":
            return read_wav(f"{archive}:{offset}", data)
        if data[:6] == b"\x93NUMPY":
            return np.load(io.BytesIO(data)).astype(np.float32), 0
        raise DataError(f"{where}: bytes {offset}:{offset + length} of {archive} are neither a wav nor a .npy")
    file = root / spec
    if not file.is_file():
        raise DataError(f"{where}: the audio file {file} does not exist")
    if file.suffix == ".npy":
        try:
            return np.load(file).astype(np.float32), 0
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{where}: cannot read the filterbank {file} ({exc})") from exc
    audio, rate = read_audio(file)
    return resample(audio, rate), SAMPLE_RATE


def s2t_task(folder: Path | str, train_split: str, eval_split: str, n_train: int | None, n_eval: int | None):
    folder = Path(folder)
    train = read_s2t_manifest(folder / f"{train_split}.tsv", n_train)
    evals = read_s2t_manifest(folder / f"{eval_split}.tsv", n_eval)
    return SpeechTask(f"s2t-{folder.name}", train, evals, word_level=False)
