"""GGML-block weights end to end (issue 19): `q4` quantized at load and `gguf` served as the file holds it.

The exact reference is the same model dequantized to fp32 and served by the fp32 engine: for gguf,
gguf_convert.convert's fp32 directory of the file (what modelstore builds for a local run); for q4,
the safetensors checkpoint with every attention/MLP weight replaced by the fp32 values of its Q4_1
blocks. The quantized engine computes x @ dequantize(blocks).T in row chunks, so it differs from the
reference only in summation order: last-position logits agree to LOGIT_ATOL and the first 32 greedy
tokens are equal, at tp1 pp1 (in this process) and in the tp2 pp1, tp1 pp2 and tp2 pp2 worlds (every
model loaded in turn in one process group per world). The tiny GGUFs (tests/support/tiny_gguf.py)
cover Q4_1 and Q8_0 linears, a fused q/k/v in Q8_0 next to Q4_1 layers, a tied Q8_0 embedding and
LM head, an F16 embedding with a Q4_1 output, and llama.cpp's q/k row order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from largemodel.modelfacts import ModelConfigError
from largemodel.runtime import cpu_kernels, gguf_load, quant
from largemodel.runtime.engine import Engine, SamplingParams
from largemodel.runtime.gguf_convert import convert
from largemodel.runtime.modelstore import gguf_model_dir
from largemodel.runtime.parallel import ParallelContext
from largemodel.runtime.weights import build_stage
from tests.support import tiny_gguf, tiny_models
from tests.support.rank_world import logs, run_world

LOGIT_ATOL = 1e-4  # fp32 logits of order 1-10; summation-order differences are ~1e-6
GREEDY = SamplingParams()
WORLDS = [(2, 1), (1, 2), (2, 2)]
Q4_VARIANTS = ("gqa", "tied")  # the tiny safetensors variants whose row-parallel slices are whole blocks at tp2


def q4_reference(src: Path, out: Path) -> Path:
    """`src` with every attention/MLP weight replaced by the fp32 values of its Q4_1 blocks."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    tensors = load_file(str(src / "model.safetensors"))
    for key, t in tensors.items():
        if ".layers." in key and key.endswith("_proj.weight"):
            tensors[key] = cpu_kernels.ggml_dequantize(cpu_kernels.ggml_quantize(t, quant.Q4_KIND), quant.Q4_KIND)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def stage(model_dir: str | Path, quantization: str, ctx: ParallelContext | None = None) -> Any:
    model, _ = build_stage(Path(model_dir), ctx or ParallelContext(), torch.float32, torch.device("cpu"), 4, 64,
                           quantization=quantization)
    return model


def generate(model: Any, prompts: list[list[int]]) -> dict[str, Any]:
    from world_main import drive

    return drive(Engine(model, ParallelContext()), prompts, tiny_models.NEW_TOKENS, GREEDY)


def compare(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert got["tokens"] == want["tokens"], f"{what}: greedy tokens differ from the dequantized fp32 model"
    torch.testing.assert_close(torch.tensor(got["logits"]), torch.tensor(want["logits"]), atol=LOGIT_ATOL, rtol=0)


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each quantized model (dir, quantization) with its fp32 reference's greedy output, generated once here."""
    root = tmp_path_factory.mktemp("ggml")
    table: dict[str, dict[str, Any]] = {}
    for variant in tiny_gguf.VARIANTS:
        path = tiny_gguf.write_tiny_gguf(root / f"{variant}.gguf", variant)
        ref = root / f"gguf-{variant}-fp32"
        ref.mkdir()
        convert(path, ref)
        table[f"gguf-{variant}"] = {"dir": str(gguf_model_dir(path, root=root / "dirs")), "quantization": "gguf",
                                    "ref": str(ref)}
    for name in Q4_VARIANTS:
        src = Path(checkpoints["models"][name]["dir"])
        table[f"q4-{name}"] = {"dir": str(src), "quantization": "q4", "ref": str(q4_reference(src, root / f"q4-{name}"))}
    prompts = checkpoints["prompts"]
    for entry in table.values():
        entry["want"] = generate(stage(entry["ref"], "none"), prompts)
    return {"prompts": prompts, "models": table}


def test_tp1_pp1_matches_the_dequantized_model(models: dict[str, Any]) -> None:
    for name, entry in models["models"].items():
        model = stage(entry["dir"], entry["quantization"])
        layers = list(model.model.layers.values())
        linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                   layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        assert all(isinstance(m, quant.GGMLLinear) and m.weight.dtype == torch.uint8 for m in linears), name
        embed, head = model.model.embed_tokens, model.lm_head
        if name == "gguf-tied":
            assert [m.kind for m in linears[4:8]] == ["q8_0", "q4_1", "q4_1", "q4_1"]  # layer 1's q/k/v
            assert [m.kind for m in linears[8:12]] == ["q4_1", "q4_1", "q4_1", "q8_0"]  # layer 2's ffn_down
            # The tied LM head is a Q8_0 GGMLLinear over the embedding's own bytes: one copy.
            assert isinstance(embed, quant.GGMLEmbedding) and isinstance(head, quant.GGMLLinear)
            assert head.kind == embed.kind == "q8_0" and head.weight is embed.weight
        elif name == "gguf-untied":
            assert {m.kind for m in linears} == {"q4_1"}
            assert embed.weight.dtype == torch.float32 and not isinstance(embed, quant.GGMLEmbedding)  # F16 in the file
            assert isinstance(head, quant.GGMLLinear) and head.kind == "q4_1"
        else:  # q4: embeddings and LM head stay in the model dtype, as with int8
            assert {m.kind for m in linears} == {"q4_1"}
            assert embed.weight.dtype == torch.float32 and head.weight.dtype == torch.float32
        compare(generate(model, models["prompts"]), entry["want"], f"{name} tp1 pp1")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("tp", "pp"), WORLDS, ids=[f"tp{t}-pp{p}" for t, p in WORLDS])
def test_world_matches_the_dequantized_model(tp: int, pp: int, models: dict[str, Any], tmp_path: Path) -> None:
    """Every quantized model in one world of tp x pp ranks: column and row slices of blocks, rope-ordered
    q/k rows, vocab-parallel GGML embedding and LM head, stages reading only their own layers."""
    spec = {
        "models": [{"name": name, "dir": e["dir"], "quantization": e["quantization"]}
                   for name, e in models["models"].items()],
        "prompts": models["prompts"], "samplings": {"greedy": tiny_models.SAMPLINGS["greedy"]},
        "micro_batches": 2, "out": str(tmp_path / "out.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    codes = run_world(tp, pp, "world_main.py", [str(tmp_path / "spec.json")], timeout_s=200, log_dir=tmp_path)
    assert codes == [0] * (tp * pp), f"exit codes {codes}\n{logs(tmp_path)}"
    results = json.loads((tmp_path / "out.json").read_text())
    for name, entry in models["models"].items():
        compare(results[name]["greedy"], entry["want"], f"{name} tp{tp} pp{pp}")
