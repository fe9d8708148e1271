"""Models and tokenizers: hub/local loading, the tiny-model factory, HF export.

This is the only module that calls ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import string
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_tokenizers import TokenizersBackend

log = logging.getLogger(__name__)

# Qwen-style ChatML: the tiny model speaks the same template as Qwen3, so prompts,
# EOS handling and template kwargs are exercised exactly as with the real model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Multi-character tokens for the phrases every math answer and construction repeats; they
# keep sequences short enough for a laptop-sized model to learn the format.
TINY_PHRASE_TOKENS = [
    "\\boxed{", "Final Answer: ", "<analysis>", "</analysis>", "<reconstruction>",
    "</reconstruction>", "Wait, let me double-check", "Step ",
    # the synthetic task's recurring phrases (tapo_ds/synthetic): shorter sequences, faster learning
    "From ", " is wrong: ", " error).", "the problem says ", "Problem: ", "\nWrong:\n", "\nRight:\n",
    "Find the first wrong step and fix it.", " step ",
]
TINY_CHARS = string.printable  # digits, letters, punctuation, whitespace


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with a few phrase tokens, built offline."""
    vocab: dict[str, int] = {}
    for tok in TINY_SPECIAL_TOKENS + ["<unk>"] + TINY_PHRASE_TOKENS + list(TINY_CHARS):
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    # Phrase tokens match before the per-character split; not special, so decode keeps them.
    tok.add_tokens(TINY_PHRASE_TOKENS)
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_model_and_tokenizer(seed: int = 0, **overrides):
    """A randomly initialised Qwen3 causal LM and its tokenizer, for the quickstart and tests."""
    tokenizer = build_tiny_tokenizer()
    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    declared = _declared_tokenizer_class(path)
    if declared in _GENERIC_TOKENIZER_CLASSES and type(tok).__name__ not in _GENERIC_TOKENIZER_CLASSES:
        # transformers forces e.g. Qwen2Tokenizer on model_type=qwen2 folders, which rebuilds
        # the pre-tokenizer and re-tokenizes a custom tokenizer.json differently: trust the file.
        log.warning("AutoTokenizer gave %s for %s, whose tokenizer_config declares %s; using the latter",
                    type(tok).__name__, path, declared)
        tok = TokenizersBackend.from_pretrained(path)
    if tok.pad_token is None:
        # Qwen3 ships a pad token; others (Llama) do not: reuse EOS, masks keep it harmless.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declared_tokenizer_class(path: str) -> str | None:
    cfg = Path(path) / "tokenizer_config.json"
    if not cfg.is_file():
        return None  # a hub id: AutoTokenizer's choice is the published one
    return json.loads(cfg.read_text()).get("tokenizer_class")


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load a causal LM from a hub id or local folder (inside zero.Init when the caller set it up)."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
    )


def model_factory(config):
    """Build an empty, un-hooked model of the same architecture (for the rollout's copy)."""
    return lambda: AutoModelForCausalLM.from_config(config)


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    # Chat models end an assistant turn with <|im_end|> even when EOS is <|endoftext|>.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


GGUF_QUANT_METHOD = "gguf"


def drop_gguf_quantization(config) -> bool:
    """Remove the ``quantization_config`` a GGUF load leaves on a config (and its text config); True if
    there was one.

    Our models from GGUF are dequantised plain models; left in ``config.json``, the key makes
    ``from_pretrained`` (and lm-eval's ``hf`` model) refuse the folder without a ``gguf_file=``.
    Other quantisation methods are kept: their weights are what the key says.
    """
    dropped = False
    # A composite config holds the text model's config separately; a plain one returns itself (once).
    for cfg in {id(c): c for c in (config, config.get_text_config(decoder=True))}.values():
        quant = getattr(cfg, "quantization_config", None)
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if method is not None and str(getattr(method, "value", method)) == GGUF_QUANT_METHOD:
            del cfg.quantization_config
            dropped = True
    return dropped


def make_plain_hf_folder(folder: str | os.PathLike) -> bool:
    """Drop a GGUF ``quantization_config`` from a saved folder's ``config.json`` (one written before
    exports dropped it); True if the file changed."""
    config = AutoConfig.from_pretrained(folder)
    if not drop_gguf_quantization(config):
        return False
    config.save_pretrained(folder)
    return True


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike,
              state_dict: dict | None = None) -> Path:
    """Write ``save_pretrained`` + tokenizer so lm-eval and ``from_pretrained`` read it: a plain HF
    folder, without the GGUF ``quantization_config`` of a model that came from a GGUF file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if drop_gguf_quantization(model.config):
        log.info("export to %s: dropped the GGUF quantization_config (the weights are dequantised)", out)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_state_checked(model: torch.nn.Module, state: dict, source: str) -> torch.nn.Module:
    """Load a full state dict, allowing only a tied ``lm_head`` to be absent: a silently
    missing tensor would otherwise leave random weights in an export."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{source}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    return model


def load_gguf(folder: str | os.PathLike, gguf_file: str):
    """A GGUF checkpoint as a plain HF model + tokenizer (dequantised, float32).

    transformers reads GGUF through ``gguf_file=`` (needs the ``gguf`` package) but the
    model it returns cannot ``save_pretrained``; rebuilding it from its config and copying
    the state dict gives an ordinary model that can.
    """
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model = load_state_checked(AutoModelForCausalLM.from_config(loaded.config), loaded.state_dict(), gguf_file)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
