"""The Dockerfile's images, built here and run: the operator image reconciles, the CPU runtime image serves.

No daemon and no registry: buildah builds the Dockerfile unchanged, its base images given as build args
(a debootstrap bookworm + Python 3.11 stand-in for the pinned python:3.11-slim-bookworm, see
imagebuild.py), and `buildah run --isolation chroot` runs containers of the results on the host network,
with the root filesystem read-only as the chart and the operator's rank pods run them.

- operator target: its default entrypoint and command, as user 10001, against the operator suite's mock
  API server (tests/support/mockcluster.py) through a kubeconfig mounted read-only, reconciles a
  LargeModel into its StatefulSet and Services; the image's own HEALTHCHECK passes meanwhile.
- runtime target, TORCH=cpu (torch 2.13.0+cpu from a loopback PEP 503 index): ships the prebuilt CPU
  kernels and no compiler, and `largemodel run` of a tiny model inside it answers a completion.

Sizes and build times go to build/imagetest/measurements.json and the log (docs/CLUSTER.md, "Images").
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from largemodel.operator.builders import LABEL_NAME
from largemodel.runtime.local import NotReadyError, free_port, wait_ready
from tests.support.imagebuild import (
    STANDIN,
    WORK,
    Buildah,
    log,
    open_buildah,
    readonly_container,
    running,
    standin_tarball,
    torch_cpu_index,
)
from tests.support.mockcluster import apps_path, core_path, lm_path, running_cluster
from tests.support.operatorrun import wait_for
from tests.support.paths import REPO
from tests.support.tiny_models import build_tiny_llama
from tests.support.world import write_largemodel

NS = "models"
OPERATOR_PORT = 8080  # the image's default command serves /healthz there, as its HEALTHCHECK expects
MEASUREMENTS = WORK / "measurements.json"
RUNTIME_RUN: dict[str, str] = {}  # the serving test's rank log, for the kernel test after it

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _record(**values: Any) -> None:
    data = json.loads(MEASUREMENTS.read_text()) if MEASUREMENTS.exists() else {}
    data.update(values)
    MEASUREMENTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    log(" ".join(f"{k}={v}" for k, v in values.items()))


@pytest.fixture(scope="module")
def buildah() -> Iterator[Buildah]:
    """buildah with storage of its own, the stand-in base imported; all of it removed afterwards."""
    for tool in ("buildah", "debootstrap"):
        assert shutil.which(tool), f"{tool} is not installed: `scripts/setup.sh dev` installs it (apt)"
    assert os.geteuid() == 0, "buildah (chroot isolation, bind mounts) and debootstrap run as root here"
    began = time.monotonic()
    tarball = standin_tarball()
    builder = open_buildah(WORK / f"storage-{os.getpid()}", tarball)
    _record(standin_seconds=round(time.monotonic() - began), standin_mb=builder.size_mb(STANDIN),
            storage_driver=builder.driver)
    try:
        yield builder
    finally:
        began = time.monotonic()
        builder.close()
        _record(cleanup_seconds=round(time.monotonic() - began))


@pytest.fixture(scope="module")
def operator_image(buildah: Buildah) -> str:
    tag = "localhost/largemodel-operator:test"
    # PREBUILT_KERNELS=0: the wheel stage's kernels go into the runtime image only.
    seconds = buildah.build(tag, "operator", {"PYTHON_BASE": STANDIN, "PREBUILT_KERNELS": "0"},
                            WORK / "build-operator.log", timeout=900)
    _record(operator_build_seconds=round(seconds), operator_mb=buildah.size_mb(tag))
    return tag


@pytest.fixture(scope="module")
def runtime_cpu_image(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory) -> str:
    tag = "localhost/largemodel-runtime:test-cpu"
    with torch_cpu_index(tmp_path_factory.mktemp("torch-index")) as index:
        seconds = buildah.build(tag, "runtime", {"PYTHON_BASE": STANDIN, "TORCH": "cpu", "TORCH_CPU_INDEX": index},
                                WORK / "build-runtime-cpu.log", timeout=1500)
    _record(runtime_cpu_build_seconds=round(seconds), runtime_cpu_mb=buildah.size_mb(tag))
    return tag


def _config(buildah: Buildah, image: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(OCI config, Docker config) of an image."""
    inspected = buildah.inspect(image)
    return inspected["OCIv1"]["config"], inspected["Docker"]["config"]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_operator_image_reconciles_a_largemodel(buildah: Buildah, operator_image: str, tmp_path: Path) -> None:
    oci, docker = _config(buildah, operator_image)
    assert oci["User"] == "10001:10001", "the chart's runAsUser/runAsGroup"
    argv = oci["Entrypoint"] + oci["Cmd"]
    assert argv == ["largemodel", "operator", "--all-namespaces"]
    healthcheck = docker["Healthcheck"]["Test"]
    assert healthcheck[0] == "CMD"
    assert _port_free(OPERATOR_PORT), f"127.0.0.1:{OPERATOR_PORT} is taken: the image's default command needs it"

    with running_cluster(tmp_path, [NS]) as cluster:
        kube = tmp_path / "kube"
        kube.mkdir()
        # The chart mounts the ServiceAccount's credentials read-only (a projected volume); here a
        # kubeconfig for the mock API server (plain HTTP on 127.0.0.1) takes their place. Not under
        # /var/run: that is a link to /run, and buildah resolves a volume's target on the host.
        (kube / "kubeconfig").write_text(cluster.kubeconfig.read_text())
        mount = "/etc/largemodel/kube"
        with readonly_container(buildah, operator_image, [mount]) as ctr:
            # Even root cannot write it. (buildah 1.28 panics in its clean-up after a command in a
            # read-only root and may drop the command's output: its own line says how touch exited.)
            probe = buildah.run(ctr, ["touch", "/probe"], user="0:0", check=False)
            said = probe.stdout + probe.stderr
            assert "Read-only file system" in said or "subprocess exited with status 1" in said, said[-2000:]
            env = {"KUBECONFIG": f"{mount}/kubeconfig", "POD_NAMESPACE": NS}  # as the chart's env
            cmd = buildah.run_argv(ctr, argv, env=env, volumes=[f"{kube}:{mount}:ro"], tmpfs=["/tmp"])
            with running(cmd, tmp_path / "operator.log") as proc:
                # The image's HEALTHCHECK command, from a second container of the image (buildah runs
                # one command per container at a time; both share the host network).
                prober = buildah("from", "--pull=false", operator_image)

                def healthy() -> bool:
                    assert proc.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
                    done = buildah.run(prober, healthcheck[1:], check=False, timeout=30)
                    (tmp_path / "healthcheck.log").write_text(done.stdout + done.stderr)
                    return done.returncode == 0

                try:
                    wait_for(healthy, "the image's HEALTHCHECK to pass", timeout=60)
                finally:
                    buildah("rm", prober)
                body = yaml.safe_load((REPO / "examples" / "smollm2-local.yaml").read_text())
                cluster.create(lm_path(NS), body)
                name = body["metadata"]["name"]
                selector = f"{LABEL_NAME}={name}"
                sets = wait_for(lambda: cluster.list(apps_path("statefulsets", NS), selector),
                                "the operator in the image to create the StatefulSet", timeout=60)
                services = wait_for(lambda: cluster.list(core_path("services", NS), selector),
                                    "the operator in the image to create the Services", timeout=30)
                status = wait_for(lambda: (cluster.get(lm_path(NS, name)) or {}).get("status"),
                                  "the LargeModel's status", timeout=30)
                assert proc.poll() is None, (tmp_path / "operator.log").read_text()[-3000:]
            operator_log = (tmp_path / "operator.log").read_text()
    assert [s["metadata"]["name"] for s in sets] and len(services) >= 1, operator_log[-3000:]
    owner = {ref["name"] for s in sets for ref in s["metadata"].get("ownerReferences", [])}
    assert owner == {name}
    assert status.get("conditions"), status
    assert "Traceback" not in operator_log, operator_log[-3000:]
    # The requests came from the process in the image (kopf's and the operator's user agents).
    assert any(str(r.headers.get("User-Agent", "")).startswith("kopf/") for r in list(cluster.mock._requests))


def test_cpu_runtime_image_serves_a_completion(buildah: Buildah, runtime_cpu_image: str, tmp_path: Path) -> None:
    oci, docker = _config(buildah, runtime_cpu_image)
    assert oci["User"] == "1000:1000" and oci["Entrypoint"] == ["largemodel"] and oci["Cmd"] == ["rank"]
    assert docker.get("Healthcheck", {}).get("Test", [""])[0] == "CMD"
    env = dict(item.split("=", 1) for item in oci["Env"])
    kernel_dir = env["LARGEMODEL_KERNEL_DIR"]

    # Mounted into the container: under build/ rather than pytest's temp dir, which another pytest
    # session on the same machine may rotate away while the ranks still read it.
    scratch = WORK / f"runtime-test-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    model = build_tiny_llama(scratch / "model")
    # The ranks run as 1000: the checkpoint must be readable by them (safetensors writes its file 0600,
    # and a rank that cannot read it says "No such file or directory").
    for path in [scratch, model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    lm_dir = scratch / "lm"
    lm_dir.mkdir()
    write_largemodel(lm_dir / "tiny.yaml", "tiny", Path("/models/tiny"), pp=2)
    # What the image holds, from a plain container (buildah 1.28 panics after a command in a read-only
    # root, in its clean-up, so there the exit status is lost; the output is not).
    plain = buildah("from", "--pull=false", runtime_cpu_image)
    try:
        facts = buildah.run(plain, ["sh", "-c",
                                    f"command -v gcc g++ c++ cc || true; ls {kernel_dir}; "
                                    f"for so in {kernel_dir}/*.so; do ldd $so | grep 'not found' || true; done; "
                                    "python -c 'import torch; print(torch.__version__, torch.cuda.is_available())'"])
    finally:
        buildah("rm", plain)
    with readonly_container(buildah, runtime_cpu_image, ["/models/tiny", "/etc/largemodel"]) as ctr:
        lines = facts.stdout.split()
        assert lines[-2:] == ["2.13.0+cpu", "False"], facts.stdout
        levels = sorted({f.split("-")[1] for f in lines if f.startswith("cpu_kernels-") and f.endswith(".so")})
        expected = ["avx2", "avx512", "generic"] if platform.machine() in ("x86_64", "AMD64") else ["generic", "neon"]
        assert levels == expected, f"prebuilt kernels in {kernel_dir}: {facts.stdout}"
        assert not [f for f in lines if f.startswith("/")], f"a compiler in the runtime image: {facts.stdout}"

        http_port, grpc_port = free_port(), free_port()
        cmd = buildah.run_argv(
            ctr, ["largemodel", "run", "-f", "/etc/largemodel/tiny.yaml", "--port", str(http_port),
                  "--grpc-port", str(grpc_port)],
            env={"OMP_NUM_THREADS": "1"}, volumes=[f"{model}:/models/tiny:ro", f"{lm_dir}:/etc/largemodel:ro"],
            tmpfs=["/tmp"])
        log_path = tmp_path / "run.log"
        with running(cmd, log_path) as proc:
            try:
                wait_ready(f"http://127.0.0.1:{http_port}/readyz", [proc], 300)
            except NotReadyError as err:
                raise AssertionError(f"{err}:\n{log_path.read_text()[-4000:]}") from None
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/completions", method="POST",
                data=json.dumps({"model": "tiny", "prompt": "def main", "max_tokens": 4, "temperature": 0}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as reply:
                answer = json.loads(reply.read())
        run_log = log_path.read_text()
    shutil.rmtree(scratch, ignore_errors=True)
    assert answer["choices"][0]["text"] and 1 <= answer["usage"]["completion_tokens"] <= 4, answer
    assert "found" not in lines, f"the prebuilt kernels' libraries are not all in the image: {facts.stdout}"
    assert "event=kernel_build " not in run_log, "a rank compiled kernels in the image"
    RUNTIME_RUN["log"], RUNTIME_RUN["kernel_dir"] = run_log, kernel_dir


def test_cpu_runtime_ranks_load_the_prebuilt_kernels() -> None:
    """The ranks of the serving test above loaded the image's kernels: nothing compiled, nothing written."""
    assert RUNTIME_RUN, "test_cpu_runtime_image_serves_a_completion did not run"
    run_log, kernel_dir = RUNTIME_RUN["log"], RUNTIME_RUN["kernel_dir"]
    loaded = [line for line in run_log.splitlines() if "event=kernel_loaded" in line]
    assert loaded and all(f"path={kernel_dir}/cpu_kernels-" in line for line in loaded), run_log[-4000:]
