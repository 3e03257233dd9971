"""Deployment files, checked without a Docker engine: hadolint on the Dockerfile, the compose and
Kubernetes wiring (ports, probes, env names that exist in the settings), and the image's
entrypoint command run here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from initserve.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SETTING_ENV_NAMES = {f"INITSERVE_{name.upper()}" for name in Settings.model_fields}


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
    ]


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one stage of the Dockerfile."""
    out: list[tuple[str, str]] = []
    inside = False
    for instruction, args in dockerfile_instructions():
        if instruction == "FROM":
            inside = args.split()[-1] == name
        elif inside:
            out.append((instruction, args))
    return out


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--config", str(REPO / ".hadolint.yaml"), str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_image_is_non_root_with_a_healthcheck_and_one_worker() -> None:
    cpu = stage("cpu")
    users = [args for instruction, args in cpu if instruction == "USER"]
    assert users and users[-1] == "10001"
    health = " ".join(args for instruction, args in cpu if instruction == "HEALTHCHECK")
    assert "/livez" in health
    assert ("EXPOSE", "8000") in cpu
    env = " ".join(args for instruction, args in cpu if instruction == "ENV")
    assert set(re.findall(r"INITSERVE_[A-Z_]+", env)) <= SETTING_ENV_NAMES
    gpu = stage("gpu")
    assert [args for instruction, args in gpu if instruction == "USER"][-1] == "10001"
    assert any("cupy-cuda12x" in args for instruction, args in gpu if instruction == "RUN")
    assert "INITSERVE_BACKEND=gpu" in " ".join(
        args for instruction, args in gpu if instruction == "ENV"
    )


def test_the_images_entrypoint_command_runs_here() -> None:
    cpu = stage("cpu")
    entrypoint = json.loads(next(args for instruction, args in cpu if instruction == "ENTRYPOINT"))
    command = json.loads(next(args for instruction, args in cpu if instruction == "CMD"))
    executable = shutil.which(entrypoint[0]) or str(Path(sys.executable).parent / entrypoint[0])
    result = subprocess.run(
        [executable, *entrypoint[1:], *command, "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--port" in result.stdout
    # The healthcheck's command is valid Python that exits non-zero without a server.
    health = next(args for instruction, args in cpu if instruction == "HEALTHCHECK")
    probe = json.loads(health[health.index("CMD") + 3 :].strip())
    assert probe[0] == "python"
    run = subprocess.run([sys.executable, *probe[1:]], capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and ("URLError" in run.stderr or "Connection refused" in run.stderr)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return loaded


def test_compose_wiring() -> None:
    services = compose()["services"]
    server, trainer = services["initserve"], services["trainer"]
    assert server["build"]["target"] == "cpu"
    assert "8000:8000" in server["ports"]
    assert set(server["environment"]) <= SETTING_ENV_NAMES
    assert any("/readyz" in part for part in server["healthcheck"]["test"])
    assert trainer["depends_on"]["initserve"]["condition"] == "service_healthy"
    assert trainer["environment"]["INITSERVE_URL"] == "http://initserve:8000"
    assert "/examples/trainer.py" in " ".join(trainer["entrypoint"])
    assert (REPO / "examples" / "trainer.py").exists()


def pod() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        (REPO / "deploy" / "kubernetes" / "initserve-sidecar.yaml").read_text()
    )
    return loaded


def test_kubernetes_native_sidecar_wiring() -> None:
    spec = pod()["spec"]
    (sidecar,) = spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: runs beside the trainer
    port = sidecar["ports"][0]
    assert port["containerPort"] == 8000 and port["name"] == "http"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert sidecar["resources"]["requests"]["cpu"] and sidecar["resources"]["requests"]["memory"]
    env = {item["name"]: item["value"] for item in sidecar["env"]}
    assert set(env) <= SETTING_ENV_NAMES
    assert env["INITSERVE_PORT"] == str(port["containerPort"])
    Settings(**{k.removeprefix("INITSERVE_").lower(): v for k, v in env.items()})  # values parse
    assert sidecar["securityContext"]["runAsUser"] == 10001
    (trainer,) = spec["containers"]
    trainer_env = {item["name"]: item["value"] for item in trainer["env"]}
    assert trainer_env["INITSERVE_URL"] == f"http://127.0.0.1:{port['containerPort']}"
    # The grace period covers the sidecar's drain.
    assert spec["terminationGracePeriodSeconds"] > float(env["INITSERVE_DRAIN_SECONDS"])


@pytest.mark.parametrize("path", ["pyproject.toml", "clients/python/pyproject.toml"])
def test_packages_declare_their_entry_points(path: str) -> None:
    import tomllib

    project = tomllib.loads((REPO / path).read_text())["project"]
    assert project["scripts"]
    if path.startswith("clients"):
        assert not any(
            dep.split(">")[0].split("=")[0] in ("fastapi", "uvicorn", "initserve", "cupy-cuda12x")
            for dep in project["dependencies"]
        )


@pytest.mark.slow  # pip builds both wheels: ~10 s, the packaging end to end
def test_wheels_hold_every_module_and_no_other(tmp_path: Path) -> None:
    """What the image installs: both wheels, built from this tree's files as the image's build
    context holds them (no build/ left by an earlier install: setuptools reuses build/lib, and a
    module since moved or deleted would ship again beside its new home), with exactly the
    tree's modules in them."""
    import zipfile

    context = tmp_path / "context"
    tracked = ["pyproject.toml", "setup.py", "README.md", "service", "clients/python"]
    listing = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "--", *tracked],
        cwd=REPO, check=True, capture_output=True, text=True,
    )  # fmt: skip
    files = listing.stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, context / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(context), str(context / "clients" / "python")],
                   check=True, capture_output=True)  # fmt: skip
    (server,) = wheels.glob("initserve-*.whl")
    (client,) = wheels.glob("initserve_client-*.whl")
    names = set(zipfile.ZipFile(server).namelist())
    modules = {str(p.relative_to(context / "service")) for p in (context / "service").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == modules
    for kernel in ("initserve_math.h", "gpu_kernels.cu", "cpu_kernels.c"):
        assert f"initserve/kernels/{kernel}" in names
    assert any(n.startswith("initserve/kernels/_cpu_kernels") and n.endswith(".so") for n in names)
    client_names = set(zipfile.ZipFile(client).namelist())
    source = context / "clients" / "python" / "src"
    client_modules = {str(p.relative_to(source)) for p in source.rglob("*.py")}
    assert {n for n in client_names if n.endswith(".py")} == client_modules


KUBERNETES_VERSION = "1.33.0"  # native sidecars (1.29) and Indexed Jobs' pod hostnames (1.24)
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    """Strict: an unknown or misspelt field is an error, as `kubectl apply --validate=strict`.
    The schemas ship inside kubernetes-validate: nothing is fetched."""
    import kubernetes_validate

    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    import kubernetes_validate

    broken = documents(REPO / "deploy" / "kubernetes" / "central-service.yaml")[0]
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def by_kind(path: str) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in documents(REPO / "deploy" / "kubernetes" / path)}


def test_training_job_shares_the_socket_directory_with_one_sidecar_per_pod() -> None:
    job = by_kind("training-job.yaml")["Job"]
    assert job["spec"]["completionMode"] == "Indexed"
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    (sidecar,) = pod["initContainers"]
    (trainer,) = pod["containers"]
    assert sidecar["restartPolicy"] == "Always"
    assert trainer["command"][0] == "torchrun"
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in trainer["command"]
    mounts = {
        c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        for c in (sidecar, trainer)
    }
    # The socket directory is all the two share: regions are memfds passed over the socket.
    assert mounts["initserve"] == {"initserve-socket": "/run/initserve"}
    assert mounts["trainer"] == {**mounts["initserve"], "dshm": "/dev/shm"}
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert set(env) <= SETTING_ENV_NAMES
    Settings(**{k.removeprefix("INITSERVE_").lower(): v for k, v in env.items()})
    assert env["INITSERVE_ALLOW_SHARED_MEMORY"] == "true"
    socket_path = env["INITSERVE_UDS"]
    assert socket_path.startswith(mounts["initserve"]["initserve-socket"] + "/")
    trainer_env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert trainer_env["INITSERVE_UDS"] == socket_path
    # The server writes regions of its own user only: both containers run as one user.
    assert pod["securityContext"]["runAsUser"] and "runAsUser" not in sidecar["securityContext"]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"


def test_central_service_scales_on_cpu_and_routes_to_ready_replicas() -> None:
    kinds = by_kind("central-service.yaml")
    deployment, service, hpa = (
        kinds["Deployment"],
        kinds["Service"],
        kinds["HorizontalPodAutoscaler"],
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilisation is of this
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    env = {e["name"] for e in container["env"]}
    assert env <= SETTING_ENV_NAMES
