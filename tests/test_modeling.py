"""Tiny model factory, tokenizer round trip through save/load (qwen2 folders included), HF export."""

import torch
import transformers

from tapo_ds.modeling import build_tiny_model_and_tokenizer, export_hf, load_model, load_tokenizer, stop_token_ids

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
