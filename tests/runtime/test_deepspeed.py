"""ENGINE=deepspeed (DeepSpeed inference AutoTP on CPU) gives the native engine's tokens."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from largemodel.runtime.deepspeed_engine import DeepSpeedConfigError, load_autotp
from largemodel.runtime.parallel import ParallelContext
from tests.support.pods import group_env, running_pods
from tests.support.rank_world import logs, run_world
from tests.support.tiny_models import SAMPLINGS, VARIANTS, word


@pytest.mark.timeout(150)
def test_deepspeed_autotp_matches_native(checkpoints: dict[str, Any], seeded_single_process: dict[str, Any],
                                         tmp_path: Path) -> None:
    """tp=2 AutoTP: greedy tokens equal transformers (= native), seeded sampling equals the native engine's."""
    variants = [v for v in VARIANTS if v.valid(2, 1) and v.config["num_key_value_heads"] % 2 == 0]
    spec = {
        "models": [{"name": v.name, "dir": checkpoints["models"][v.name]["dir"]} for v in variants],
        "prompts": checkpoints["prompts"], "samplings": SAMPLINGS, "micro_batches": 1, "engine": "deepspeed",
        "out": str(tmp_path / "out.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    codes = run_world(2, 1, "world_main.py", [str(tmp_path / "spec.json")], timeout_s=130, log_dir=tmp_path)
    assert codes == [0, 0], f"exit codes {codes}\n{logs(tmp_path)}"
    results = json.loads((tmp_path / "out.json").read_text())
    for v in variants:
        got, ref = results[v.name], checkpoints["models"][v.name]
        assert got["greedy"]["tokens"] == ref["tokens"], f"{v.name}: DeepSpeed greedy tokens differ"
        torch.testing.assert_close(torch.tensor(got["greedy"]["logits"]), torch.tensor(ref["logits"]),
                                   atol=1e-4, rtol=1e-4)
        assert got["seeded"]["tokens"] == seeded_single_process[v.name], f"{v.name}: seeded tokens differ from native"


def test_deepspeed_rejects_pipeline_parallel_with_a_clear_error(checkpoints: dict[str, Any]) -> None:
    """AutoTP is tensor parallel only: pp > 1 is refused with what to change, before anything loads."""
    with pytest.raises(DeepSpeedConfigError, match="pipeline to 1"):
        load_autotp(Path(checkpoints["models"]["gqa"]["dir"]), ParallelContext(tp=1, pp=2), torch.float32, 4, 64)


@pytest.mark.timeout(150)
def test_engine_deepspeed_pod_serves_native_tokens(checkpoints: dict[str, Any], tmp_path: Path) -> None:
    """`largemodel rank` with ENGINE=deepspeed, tp=2: the completion equals transformers; SIGTERM exits 0."""
    model = checkpoints["models"]["gqa"]
    with running_pods(group_env(Path(model["dir"]), tp=2, pp=1, ENGINE="deepspeed"), tmp_path,
                      ready_timeout_s=120) as pods:
        body = {"model": "tiny", "prompt": " ".join(map(word, checkpoints["prompts"][0])), "max_tokens": 8,
                "temperature": 0}
        reply = httpx.post(f"{pods.http_url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].split() == [word(t) for t in model["tokens"][0][:8]]
        assert "deepspeed_autotp_ready" in pods.tail()
        pods.procs[0].send_signal(signal.SIGTERM)
        assert pods.wait_exit(60) == [0], pods.tail()
