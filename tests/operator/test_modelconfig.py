"""`largemodel inspect`: config.json -> architecture, with transformers as the parameter-count oracle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from largemodel.operator import api
from largemodel.operator.modelconfig import ModelConfigError, inspect_model
from tests.support.examples import run_largemodel
from tests.support.paths import REPO

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# (config class, model class, kwargs): real shapes of the families the runtime supports.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama3-70b": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=80, hidden_size=8192,
        intermediate_size=28672, vocab_size=128256, architectures=["LlamaForCausalLM"])),
    "llama2-7b": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=32, num_key_value_heads=32, num_hidden_layers=32, hidden_size=4096,
        intermediate_size=11008, vocab_size=32000)),
    "llama-biased-headdim": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, hidden_size=96,
        intermediate_size=160, vocab_size=1000, head_dim=32, attention_bias=True, mlp_bias=True)),
    "mistral-7b": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32, hidden_size=4096,
        intermediate_size=14336, vocab_size=32000, architectures=["MistralForCausalLM"])),
    "qwen2-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=24, hidden_size=896,
        intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)),
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30, hidden_size=576,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)),
}


def save_config(tmp_path: Path, family: str) -> tuple[Path, int]:
    """Write the family's real config.json; return its directory and transformers' parameter count."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):  # shapes only: no memory for 70B parameters
        model = getattr(transformers, model_cls)(config)
    return tmp_path, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parameter_count_matches_transformers(tmp_path: Path, family: str) -> None:
    model_dir, expected = save_config(tmp_path, family)
    arch = inspect_model(model_dir)
    assert arch.parameters == expected
    kwargs = FAMILIES[family][2]
    assert arch.num_attention_heads == kwargs["num_attention_heads"]
    assert arch.num_key_value_heads == kwargs["num_key_value_heads"]
    assert arch.num_hidden_layers == kwargs["num_hidden_layers"]
    assert arch.tie_word_embeddings is kwargs.get("tie_word_embeddings", False)
    # A file path works as well as the directory.
    assert inspect_model(model_dir / "config.json") == arch


def test_smollm2_matches_the_local_example(tmp_path: Path) -> None:
    model_dir, _ = save_config(tmp_path, "smollm2-135m")
    example = yaml.safe_load((REPO / "examples/smollm2-local.yaml").read_text())
    assert inspect_model(model_dir) == api.Architecture.model_validate(example["spec"]["model"]["architecture"])


def test_cli_inspect_prints_the_architecture_block(tmp_path: Path) -> None:
    model_dir, expected = save_config(tmp_path, "llama3-70b")
    result = run_largemodel("inspect", str(model_dir))
    assert result.returncode == 0, result.stderr
    block = yaml.safe_load(result.stdout)
    assert list(block) == ["architecture"]
    arch = api.Architecture.model_validate(block["architecture"])
    assert arch.parameters == expected == 70553706496
    assert block["architecture"]["numKeyValueHeads"] == 8
    as_json = run_largemodel("inspect", str(model_dir / "config.json"), "-o", "json")
    assert json.loads(as_json.stdout) == block


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_head": 12},
         "unsupported architecture GPT2LMHeadModel (model_type 'gpt2'); supported: Llama (model_type llama), "
         "Mistral (model_type mistral), Qwen2 (model_type qwen2), SmolLM (model_type llama)"),
        ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]},
         "unsupported architecture LlamaForSequenceClassification"),
        ({"architectures": ["LlamaForCausalLM"]}, "(model_type 'missing')"),
        ({"model_type": "llama", "num_attention_heads": 8}, "vocab_size: Field required"),
        ({"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 3, "num_hidden_layers": 2,
          "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100},
         "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_configs_get_a_clear_error(tmp_path: Path, config: Any, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError) as err:
        inspect_model(tmp_path)
    assert message in str(err.value)


def test_cli_inspect_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "broken.json").write_text("{not json")
    for path, expected in [
        (tmp_path, "unsupported architecture GPT2LMHeadModel"),
        (tmp_path / "broken.json", "invalid JSON at line 1"),
        (tmp_path / "missing", "no such file"),
    ]:
        result = run_largemodel("inspect", str(path))
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr
        assert "Traceback" not in result.stderr
