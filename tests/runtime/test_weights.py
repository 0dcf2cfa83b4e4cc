"""Weights load sliced per rank: each rank reads its rows/columns only and its memory stays near its shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from largemodel.runtime.model import ModelConfigError
from largemodel.runtime.parallel import ParallelContext, TensorParallelError
from largemodel.runtime.weights import build_stage, parse_dtype
from tests.support.rank_world import MAINS, child_env

HIDDEN, INNER, LAYERS, VOCAB = 1024, 4096, 4, 1000


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A 4-layer Llama of ~270 MB in fp32 (weights dominate a rank's memory), written tensor by tensor."""
    root = tmp_path_factory.mktemp("wide")
    config = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INNER,
              "num_hidden_layers": LAYERS, "num_attention_heads": 8, "num_key_value_heads": 8,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
    (root / "config.json").write_text(json.dumps(config))
    tensors = {"model.embed_tokens.weight": torch.ones(VOCAB, HIDDEN), "lm_head.weight": torch.ones(VOCAB, HIDDEN),
               "model.norm.weight": torch.ones(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}.self_attn.{name}.weight"] = torch.ones(HIDDEN, HIDDEN)
        tensors[f"{p}.mlp.gate_proj.weight"] = torch.ones(INNER, HIDDEN)
        tensors[f"{p}.mlp.up_proj.weight"] = torch.ones(INNER, HIDDEN)
        tensors[f"{p}.mlp.down_proj.weight"] = torch.ones(HIDDEN, INNER)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    save_file(tensors, str(root / "model.safetensors"))
    return root, sum(t.numel() * 4 for t in tensors.values())


def _measure(model_dir: Path, tp: int, pp: int, rank: int) -> dict[str, int]:
    done = subprocess.run([sys.executable, str(MAINS / "rss_main.py"), str(model_dir), str(tp), str(pp), str(rank)],
                          env=child_env(), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(120)
def test_rank_memory_stays_near_its_shard(wide_checkpoint: tuple[Path, int]) -> None:
    """tp=2 x pp=2: a rank's peak memory grows by about its quarter, far below the whole model."""
    model_dir, total = wide_checkpoint
    whole = _measure(model_dir, 1, 1, 0)
    assert whole["peak"] - whole["before"] > 0.9 * total  # the measurement sees a full load
    for rank in (0, 3):  # a first-stage and a last-stage rank
        got = _measure(model_dir, 2, 2, rank)
        grown = got["peak"] - got["before"]
        assert got["shard"] < 0.3 * total
        assert grown < min(got["shard"] + 0.15 * total, 0.5 * total), f"rank {rank} grew {grown / 2**20:.0f} MiB for a " \
            f"{got['shard'] / 2**20:.0f} MiB shard of a {total / 2**20:.0f} MiB model"


def test_bad_model_inputs_are_clear_errors(tmp_path: Path, checkpoints: dict[str, Any]) -> None:
    """Missing files, unsupported architectures and impossible splits say what is wrong."""
    cpu = torch.device("cpu")
    with pytest.raises(ModelConfigError, match="config.json does not exist"):
        build_stage(tmp_path, ParallelContext(), torch.float32, cpu, 1, 8)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 1}))
    with pytest.raises(ModelConfigError, match="unsupported architecture none listed \\(model_type 'gpt2'\\)"):
        build_stage(tmp_path, ParallelContext(), torch.float32, cpu, 1, 8)
    config = json.loads((Path(checkpoints["models"]["gqa"]["dir"]) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(ModelConfigError, match="rope type 'yarn' is not supported"):
        build_stage(tmp_path, ParallelContext(), torch.float32, cpu, 1, 8)
    gqa = Path(checkpoints["models"]["gqa"]["dir"])  # 8 heads, 2 KV heads
    with pytest.raises(TensorParallelError, match="valid tp: 1, 2, 4, 8"):
        build_stage(gqa, ParallelContext(tp=3), torch.float32, cpu, 1, 8)
    with pytest.raises(ModelConfigError, match="pipeline=5 exceeds numHiddenLayers=4"):
        build_stage(gqa, ParallelContext(pp=5), torch.float32, cpu, 1, 8)
    with pytest.raises(ValueError, match="dtype 'int3' is not supported"):
        parse_dtype("int3")


def test_vocab_padding_and_kv_replication_shapes(checkpoints: dict[str, Any]) -> None:
    """Prime vocab 131 at tp=4 pads to 33 rows per rank (last rank: 32 real + 1 zero); MQA keeps its one KV head."""
    tied = Path(checkpoints["models"]["tied"]["dir"])
    last = build_stage(tied, ParallelContext(tp=4, tp_rank=3), torch.float32, torch.device("cpu"), 1, 8)[0]
    assert last.model.embed_tokens is not None and last.lm_head is not None
    assert last.model.embed_tokens.weight.shape[0] == 33
    assert torch.count_nonzero(last.model.embed_tokens.weight[-1]) == 0
    assert last.lm_head.weight is last.model.embed_tokens.weight  # tied: one copy
    mqa = build_stage(Path(checkpoints["models"]["mqa"]["dir"]), ParallelContext(tp=4, tp_rank=2), torch.float32,
                      torch.device("cpu"), 1, 8)[0]
    attn = mqa.model.layers["0"].self_attn
    assert (attn.n_heads, attn.n_kv_heads) == (3, 1) and attn.qkv_proj.weight.shape[0] == (3 + 2) * attn.head_dim


def test_direct_reads_equal_mapped_slices(checkpoints: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole tensors and row shards are read straight into the parameters, in ranges spread over
    several readers; the result equals the safe_open slices (the fallback, forced here for every
    tensor) bit for bit, at tp 1 and tp 2, with one reader and with three."""
    from largemodel.runtime import weights

    gqa = Path(checkpoints["models"]["gqa"]["dir"])
    cpu = torch.device("cpu")
    monkeypatch.setattr(weights, "READ_CHUNK", 1000)  # not a multiple of a row: ranges split rows and tensors
    for ctx in (ParallelContext(), ParallelContext(tp=2, tp_rank=1), ParallelContext(pp=2, pp_rank=1)):
        for readers in (1, 3):
            used: list[bool] = []

            def counted(*args: Any, direct: Any = weights.direct_range, used: list[bool] = used) -> Any:
                used.append(direct(*args) is not None)
                return direct(*args)

            monkeypatch.setattr(weights, "direct_range", counted)
            monkeypatch.setattr(weights, "load_threads", lambda readers=readers: readers)
            fast = build_stage(gqa, ctx, torch.float32, cpu, 1, 8)[0].state_dict()
            assert any(used) and (ctx.tp > 1 or all(used)), "row shards and whole tensors take the direct path"
            monkeypatch.setattr(weights, "direct_range", lambda *a: None)
            mapped = build_stage(gqa, ctx, torch.float32, cpu, 1, 8)[0].state_dict()
            monkeypatch.undo()
            monkeypatch.setattr(weights, "READ_CHUNK", 1000)
            assert fast.keys() == mapped.keys()
            assert all(torch.equal(fast[k], mapped[k]) for k in fast), (ctx, readers)
    # another dtype than the file's converts through the mapped path
    bf16 = build_stage(gqa, ParallelContext(), torch.bfloat16, cpu, 1, 8)[0]
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_truncated_checkpoint_and_failed_reads_are_clear_errors(checkpoints: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A file cut inside its tensors (a partial download) is named before anything is read; a read that
    fails with readers in flight is raised in the loading thread after every reader stopped."""
    import shutil
    import threading

    from largemodel.runtime import weights

    gqa = Path(checkpoints["models"]["gqa"]["dir"])
    cut = tmp_path / "cut"
    shutil.copytree(gqa, cut)
    for file in cut.glob("*.safetensors"):
        with file.open("r+b") as f:
            f.truncate(file.stat().st_size * 2 // 3)
    with pytest.raises(ModelConfigError, match="an incomplete copy or download"):
        build_stage(cut, ParallelContext(), torch.float32, torch.device("cpu"), 1, 8)

    calls: list[int] = []

    def failing(fd: int, offset: int, address: int, count: int, real: Any = weights.read_range) -> int:
        calls.append(count)
        if len(calls) == 5:
            raise ModelConfigError("safetensors file ends inside a tensor (read 0 of 4096 bytes)")
        return real(fd, offset, address, count)

    monkeypatch.setattr(weights, "READ_CHUNK", 4096)
    monkeypatch.setattr(weights, "load_threads", lambda: 3)
    monkeypatch.setattr(weights, "read_range", failing)
    with pytest.raises(ModelConfigError, match="ends inside a tensor"):
        build_stage(gqa, ParallelContext(), torch.float32, torch.device("cpu"), 1, 8)
    assert len(calls) >= 5
    assert not [t for t in threading.enumerate() if t.name.startswith("load")], "readers outlive the failed load"
