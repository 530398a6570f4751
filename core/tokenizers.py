"""Tokenizers: a byte-level BPE trained on a task's text, wrapped as a fast Hugging Face tokenizer, and loading of
real tokenizer folders (for example ../shared/data/tokenizers/gpt2)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from core.errors import ModelError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
KNOWN_EOS = ("<|endoftext|>", "</s>", "<|im_end|>", "<eos>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def train_bpe(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style, so decode(encode(s)) == s for any text) on `texts`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (or a model folder that carries its tokenizer).

    Tokenizers without a pad token (gpt2, Llama) get the EOS token as pad, as TRL does; padding positions are
    masked everywhere, so the choice never reaches a loss.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"tokenizer folder {path} does not exist; pass a folder made by save_pretrained")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "pass a folder written by tokenizer.save_pretrained, or omit --tokenizer to train one on the task"
        )
    described = any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "config.json"))
    if not described and (path / "vocab.json").exists():
        # A bare BPE vocabulary: nothing says which tokenizer class reads it (transformers then asks for
        # sentencepiece or tiktoken, which would not help). Say what the folder lacks.
        lacks = "no merges.txt and " if not (path / "merges.txt").exists() else ""
        raise ModelError(
            f"{path} holds vocab.json but {lacks}no tokenizer.json or tokenizer_config.json saying which tokenizer "
            "reads it; copy the tokenizer files of the model it came from (tokenizer.json, or tokenizer_config.json "
            "with vocab.json and merges.txt), or save it with tokenizer.save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:  # the library's own message is kept (on one line), with the folder named
        said = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"cannot load the tokenizer in {path}: {said}") from exc
    if tokenizer.eos_token is None:
        # Folders without tokenizer_config.json (gpt2's raw files) do not declare their end-of-text token.
        vocab = tokenizer.get_vocab()
        known = next((t for t in KNOWN_EOS if t in vocab), None)
        if known is not None:
            tokenizer.eos_token = known
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ModelError(f"the tokenizer in {path} has no EOS token; generation needs one to stop")
    return tokenizer


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when two tokenizers map every token string to the same id."""
    return a.get_vocab() == b.get_vocab()


def with_bos_on_plain_calls(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer to save beside a trained student: a plain call, tokenizer(text), prepends BOS as training did.

    The project encodes every prompt as BOS + tokens (core.data.encode_prompt, with add_special_tokens=False), but a
    trained BPE's or gpt2's own post-processor adds nothing, so `model.generate(**tokenizer(prompt))` on a reloaded
    student would lack the first token it always saw. The copy returned adds BOS in its post-processor, which only
    calls with special tokens read (the project's never do). Unchanged when the tokenizer has no BOS or adds it
    already (Llama's), and when it has a chat template: its prompts are the template's text, which begins with the
    BOS token itself (SmolLM2's <|im_start|>), so training added none and neither must a plain call."""
    import copy

    from tokenizers import processors

    bos, token = tokenizer.bos_token_id, tokenizer.bos_token
    if bos is None or not tokenizer.is_fast or getattr(tokenizer, "chat_template", None):
        return tokenizer
    if tokenizer("a b")["input_ids"][:1] == [bos]:
        return tokenizer
    out = copy.deepcopy(tokenizer)
    backend = out.backend_tokenizer
    add = processors.TemplateProcessing(single=f"{token} $A", pair=f"{token} $A $B", special_tokens=[(token, bos)])
    # gpt2's ByteLevel post-processor (offset trimming) is kept, with BOS after it.
    backend.post_processor = (
        add if backend.post_processor is None else processors.Sequence([backend.post_processor, add])
    )
    return out
