"""The local model build: SmolLM2's GGUF, converted with the `gguf` package, equals transformers' GGUF load.

transformers' own loader (which needs accelerate, a dev-only dependency) is the reference: the same
parameters bit for bit, the same config values the engine reads, the same token ids, decoded text and
chat prompt. The runtime extra no longer needs transformers' GGUF path at all.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from largemodel.runtime.gguf_convert import GGUFConvertError, hf_name, unpermute
from largemodel.runtime.modelstore import build_from_gguf, local_model_dir, smollm2_gguf_path

TEXTS = [
    "What is the capital of France?",
    "  two leading spaces\n\ttab and newline\r\n",
    "émoji 🤖, 中文, ünïcödé and a lone combining ́ accent",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
    "def f(x):\n    return x ** 2  # 1234567890",
    "a" * 200,
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("models") / "smollm2"
    build_from_gguf(smollm2_gguf_path(), target)
    return target


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    """transformers' GGUF load of the same file: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def test_weights_equal_transformers_gguf_load(built: Path, reference: tuple[Any, Any]) -> None:
    model, _ = reference
    ours = load_file(str(built / "model.safetensors"))
    theirs = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_config_equals_transformers_gguf_load(built: Path, reference: tuple[Any, Any]) -> None:
    model, _ = reference
    ours = json.loads((built / "config.json").read_text())
    theirs = model.config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias"):
        assert ours[key] == theirs[key], key
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"]
    # and the engine's own reader accepts it
    from largemodel.runtime.model import load_config

    assert load_config(built).rope["rope_theta"] == 100000.0


def test_tokenizer_equals_transformers_gguf_load(built: Path, reference: tuple[Any, Any]) -> None:
    from transformers import AutoTokenizer

    _, theirs = reference
    ours = AutoTokenizer.from_pretrained(built)
    assert len(ours) == len(theirs)
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
            theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def test_build_logs_progress_and_reuses_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture, built: Path) -> None:
    """A second run finds the completed directory (marker written last) and builds nothing."""
    root = tmp_path / "root"
    target = root / "HuggingFaceTB/SmolLM2-135M-Instruct"
    target.parent.mkdir(parents=True)
    target.symlink_to(built, target_is_directory=True)
    with caplog.at_level(logging.INFO, logger="largemodel.runtime.modelstore"):
        assert local_model_dir("hf://HuggingFaceTB/SmolLM2-135M-Instruct", {"LARGEMODEL_MODELS_DIR": str(root)}) == target
    assert "model.build" not in caplog.text
    assert (built / ".largemodel-complete").is_file()


def test_build_logs_each_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="largemodel.runtime.modelstore"):
        build_from_gguf(smollm2_gguf_path(), tmp_path / "m")
    steps = [r.getMessage() for r in caplog.records if "model.build" in r.getMessage()]
    assert any("step=tokenizer" in s for s in steps)
    assert any("step=dequantise progress=272/272" in s for s in steps)
    assert "model.build done" in steps[-1]
    assert not (tmp_path / "m.partial").exists()


def test_names_and_permutation() -> None:
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(GGUFConvertError, match="no Llama counterpart"):
        hf_name("blk.0.ssm_conv.weight")
    # llama.cpp's permutation (convert_hf_to_gguf.py) followed by ours is the identity
    import numpy as np

    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    heads = 2
    permuted = w.reshape(heads, 2, 16 // heads // 2, 3).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute(permuted, heads), w)
