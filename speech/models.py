"""The speech translation model: a tiny encoder-decoder from transformers' Speech2Text configuration
(two strided 1-d convolutions subsampling the filterbank frames 4x, a transformer encoder, a transformer decoder),
its batches, its label-smoothed cross-entropy, its decoder states (the datastore's keys) and greedy evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

from core.errors import ModelError
from core.metrics import bleu, chrf, exact_match
from speech.data import TargetVocab

IGNORE_INDEX = -100

# name -> sizes. "tiny" trains in a minute or two on two CPU cores; "small" is the one to use on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, attention_heads=4, ffn_dim=256, conv_channels=128),
    "small": dict(d_model=256, encoder_layers=6, decoder_layers=3, attention_heads=4, ffn_dim=1024, conv_channels=512),
}


def build_model(preset: str, vocab_size: int, n_mels: int, seed: int, dropout: float = 0.1):
    """A freshly initialised Speech2Text model; its initialisation depends only on `seed`."""
    if preset not in PRESETS:
        raise ModelError(f"unknown speech model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    config = Speech2TextConfig(
        vocab_size=vocab_size,
        d_model=p["d_model"],
        encoder_layers=p["encoder_layers"],
        decoder_layers=p["decoder_layers"],
        encoder_attention_heads=p["attention_heads"],
        decoder_attention_heads=p["attention_heads"],
        encoder_ffn_dim=p["ffn_dim"],
        decoder_ffn_dim=p["ffn_dim"],
        conv_channels=p["conv_channels"],
        conv_kernel_sizes=[5, 5],  # two stride-2 convolutions: 4x fewer encoder positions than frames
        input_feat_per_channel=n_mels,
        input_channels=1,
        max_source_positions=3000,
        max_target_positions=256,
        dropout=dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=TargetVocab.pad_id,
        bos_token_id=TargetVocab.bos_id,
        eos_token_id=TargetVocab.eos_id,
        decoder_start_token_id=TargetVocab.bos_id,
        scale_embedding=True,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Speech2TextForConditionalGeneration(config)
    return model


# -- batches ---------------------------------------------------------------------------------------------------


def make_feature(features: torch.Tensor, target_ids: Sequence[int], vocab: TargetVocab) -> dict[str, Any]:
    """One training example: filterbank (frames, mels), decoder input [bos, y_1..y_n], labels [y_1..y_n, eos]."""
    ids = list(target_ids)
    return {
        "input_features": features,
        "decoder_input_ids": torch.tensor([vocab.bos_id, *ids]),
        "labels": torch.tensor([*ids, vocab.eos_id]),
    }


def collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Pad frames with 0 (attention_mask 0), decoder inputs with pad, labels with -100; per-token extras
    (`knn_values` (L, k) with -1, `knn_distances` (L, k) with +inf) are padded like the labels."""
    B = len(rows)
    frames = max(r["input_features"].shape[0] for r in rows)
    mels = rows[0]["input_features"].shape[1]
    length = max(len(r["labels"]) for r in rows)
    feats = torch.zeros(B, frames, mels)
    mask = torch.zeros(B, frames, dtype=torch.long)
    dec = torch.full((B, length), TargetVocab.pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n, m = r["input_features"].shape[0], len(r["labels"])
        feats[i, :n], mask[i, :n] = r["input_features"], 1
        dec[i, :m], labels[i, :m] = r["decoder_input_ids"], r["labels"]
    batch = {"input_features": feats, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels}
    if "knn_values" in rows[0]:
        k = rows[0]["knn_values"].shape[1]
        values = torch.full((B, length, k), -1, dtype=torch.long)
        dists = torch.full((B, length, k), float("inf"))
        for i, r in enumerate(rows):
            m = len(r["labels"])
            values[i, :m], dists[i, :m] = r["knn_values"], r["knn_distances"]
        batch["knn_values"], batch["knn_distances"] = values, dists
    return batch


def count_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The unit the loss is averaged over: valid target tokens (labels are not shifted: position t predicts y_t)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def count_frames(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


# -- forward, loss, decoder states -----------------------------------------------------------------------------


def forward(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits (B, L, V) and the decoder's final states (B, L, d): the input of the output
    projection, after the decoder's last layer norm (the representation kNN-MT stores as keys)."""
    out = model.model(
        input_features=batch["input_features"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=(batch["decoder_input_ids"] != TargetVocab.pad_id).long(),
    )
    hidden = out.last_hidden_state  # (B, L, d)
    return model.lm_head(hidden), hidden  # (B, L, V), (B, L, d)


def label_smoothed_nll(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per token (B, L), 0 at ignored positions, fairseq's label-smoothed cross-entropy (criterions/label_smoothed_cross_entropy.py):

        loss = (1 - eps - eps_i) * (-log p(y)) + eps_i * sum_v (-log p(v)),   eps_i = eps / (V - 1)

    i.e. the cross-entropy against a target with 1 - eps on y and eps / (V - 1) on every other token."""
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, L, V)
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    nll = -logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, L)
    smooth = -logprobs.sum(-1)  # (B, L)
    eps_i = epsilon / (logits.shape[-1] - 1)
    loss = (1.0 - epsilon - eps_i) * nll + eps_i * smooth
    return loss * valid


@torch.no_grad()
def decoder_states(model, features: Sequence[dict[str, Any]], batch_size: int = 64):
    """Keys and values of a datastore: the decoder's final state at every valid target position of `features`
    (teacher forcing, eval mode) and the token it must predict there. Returns keys (N, d) float32, values (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keys, values = [], []
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size]).items()}
        _, hidden = forward(model, batch)
        valid = batch["labels"] != IGNORE_INDEX  # row-major order: utterance by utterance, position by position
        keys.append(hidden[valid].float().cpu())
        values.append(batch["labels"][valid].cpu())
    model.train(was_training)
    return torch.cat(keys), torch.cat(values)


# -- evaluation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def translate(model, features: Sequence[torch.Tensor], vocab: TargetVocab, max_new_tokens: int, batch_size: int = 64):
    """Greedy decoding with the KV cache (transformers' generate), one string per utterance."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(features), batch_size):
        rows = [{"input_features": f, "decoder_input_ids": torch.tensor([1]), "labels": torch.tensor([2])} for f in
                features[start : start + batch_size]]  # fmt: skip
        batch = collate(rows)
        ids = model.generate(
            input_features=batch["input_features"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            num_beams=1,
            do_sample=False,
            use_cache=True,
        )
        texts += [vocab.decode(row.tolist()) for row in ids]
    model.train(was_training)
    return texts


def evaluate(model, features, references: Sequence[str], vocab: TargetVocab, max_new_tokens: int):
    """BLEU and chrF (sacrebleu, core.metrics) and exact match of greedy translations. Returns (scores, outputs)."""
    outputs = translate(model, features, vocab, max_new_tokens)
    refs = [[r] for r in references]
    scores = {"bleu": bleu(outputs, refs), "chrf": chrf(outputs, refs), "exact_match": exact_match(outputs, refs)}
    return scores, outputs
