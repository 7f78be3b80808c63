"""The cluster files in infra/ agree with the project: they parse, name job files and images that
exist, ask for the resources the job asks for, install what CI installs, and hold no secret."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
YAMLS = sorted(p for d in (INFRA, ROOT / "jobs") for p in d.rglob("*.yaml"))
VAEPIPE_DOCKERFILES = sorted((INFRA / "docker").glob("Dockerfile.*"))
ENTRYPOINT = re.compile(r"vaepipe (?:train|tune|submit) --config ([^\s`'\"]+)")
SECRET_ENV = ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_BACKEND_STORE_URI",
              "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kind(path: Path, name: str) -> dict:
    return next(d for d in docs(path) if d.get("kind") == name)


def pin(text: str, package: str) -> str:
    found = set(re.findall(rf"\b{package}==([\w.]+)", text))
    assert len(found) == 1, f"expected one {package} pin, found {found}"
    return found.pop()


def workdir(dockerfile: Path) -> str:
    return re.findall(r"^WORKDIR (\S+)", dockerfile.read_text(), re.M)[-1]


def containers(doc, found=None) -> list[dict]:
    """Every container spec anywhere in a manifest (head, workers, submitter)."""
    found = [] if found is None else found
    if isinstance(doc, dict):
        found += [c for c in doc.get("containers", []) if isinstance(c, dict)]
        for v in doc.values():
            containers(v, found)
    elif isinstance(doc, list):
        for v in doc:
            containers(v, found)
    return found


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses(path):
    assert docs(path), f"{path} is empty"


def test_entrypoints_name_job_files_that_exist():
    """`--config` paths in manifests, launcher and README resolve in jobs/ (/app is the image's WORKDIR)."""
    app = workdir(INFRA / "docker" / "Dockerfile.cpu")
    named = [(p, m) for p in [*INFRA.rglob("*.yaml"), INFRA / "README.md"] for m in ENTRYPOINT.findall(p.read_text())]
    assert any(p.name == "rayjob.yaml" for p, _ in named) and any(p.name == "aws.yaml" for p, _ in named)
    for path, config in named:
        rel = config[len(app) + 1:] if config.startswith(app + "/") else config
        assert rel.startswith("jobs/") and (ROOT / rel).is_file(), f"{path.name} names {config}, not a file in jobs/"


def image_dockerfile(image: str) -> Path | None:
    """registry/vaepipe:<flavor>-<version> -> infra/docker/Dockerfile.<flavor>; vaepipe-mlflow -> infra/mlflow/Dockerfile."""
    name, _, tag = image.rpartition("/")[2].partition(":")
    if name == "vaepipe":
        return INFRA / "docker" / f"Dockerfile.{tag.split('-')[0]}"
    if name == "vaepipe-mlflow":
        return INFRA / "mlflow" / "Dockerfile"
    return None


def test_images_are_built_from_dockerfiles_here():
    images = [c["image"] for p in (INFRA / "kuberay").glob("*.yaml") for d in docs(p) for c in containers(d)]
    images += [c["image"] for c in containers(docs(INFRA / "mlflow" / "k8s.yaml"))]
    launcher = docs(INFRA / "ray-cluster" / "aws.yaml")[0]["docker"]
    images += [launcher["head_image"], launcher["worker_image"]]
    compose = docs(INFRA / "mlflow" / "docker-compose.yaml")[0]["services"]
    images += [s["image"] for s in compose.values() if "build" in s]
    assert len(images) >= 8
    for image in images:
        dockerfile = image_dockerfile(image)
        assert dockerfile is not None and dockerfile.is_file(), f"no Dockerfile here builds {image}"
    mlflow_pin = pin((ROOT / "pyproject.toml").read_text(), "mlflow")
    assert pin((INFRA / "mlflow" / "Dockerfile").read_text(), "mlflow") == mlflow_pin
    assert all(i.endswith(f":{mlflow_pin}") for i in images if "vaepipe-mlflow" in i)


@pytest.mark.parametrize("dockerfile", VAEPIPE_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_install_what_ci_installs(dockerfile):
    text = dockerfile.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = pin((ROOT / "Makefile").read_text(), "torch")
    assert torch == pin(" ".join(project["dependencies"]), "torch") == pin(text, "torch")
    runs = [ln for ln in re.findall(r"^RUN (.+)$", text, re.M) if "pip install" in ln]
    torch_at = next(i for i, ln in enumerate(runs) if "torch==" in ln)
    project_at = next(i for i, ln in enumerate(runs) if re.search(r"pip install \.(\s|$)", ln))
    assert torch_at < project_at, "torch must be installed (pinned) before the project, as the Makefile does"
    deps = {re.split(r"[\[=<>]", d)[0]: d for d in project["dependencies"]}
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==([\w.]+)", text):  # no pin that pyproject does not agree with
        assert f"{name}=={version}" in deps.get(name, ""), f"{dockerfile.name} pins {name}=={version}, pyproject: {deps.get(name)}"
    assert re.search(r"^COPY pyproject.toml", text, re.M) and re.search(r"^COPY pipeline ", text, re.M)
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0") and text.rindex("USER ") > text.rindex("pip install")
    assert re.search(r'^ENTRYPOINT \["vaepipe"\]', text, re.M)


def test_kuberay_cluster_autoscales_gpus_with_token_auth():
    rc = kind(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")["spec"]
    assert rc["enableInTreeAutoscaling"] is True and rc["headGroupSpec"]["serviceType"] == "ClusterIP"
    head = rc["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu = [g for g in rc["workerGroupSpecs"] if "nvidia.com/gpu" in containers(g)[0]["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] < gpu[0]["maxReplicas"]
    for c in containers(rc) + [{"env": rc["autoscalerOptions"]["env"], "name": "autoscaler"}]:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], c["name"]


def test_rayjob_matches_its_job_spec():
    rj = kind(INFRA / "kuberay" / "rayjob.yaml", "RayJob")["spec"]
    assert rj["shutdownAfterJobFinishes"] is True and rj["ttlSecondsAfterFinished"] > 0
    config = ENTRYPOINT.search(rj["entrypoint"]).group(1)
    cfg = load_config(ROOT / config.removeprefix(workdir(INFRA / "docker" / "Dockerfile.cpu") + "/"))
    gpu_groups = [g for g in rj["rayClusterSpec"]["workerGroupSpecs"]]
    gpus = sum(g["replicas"] * int(containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"]) for g in gpu_groups)
    assert gpus == cfg.dist.num_workers * cfg.dist.gpus_per_worker
    for g in gpu_groups:
        per_pod = int(containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"]) / cfg.dist.gpus_per_worker
        assert float(containers(g)[0]["resources"]["limits"]["cpu"]) >= per_pod * (cfg.dist.cpus_per_worker + cfg.data.loader_workers)
    for c in containers(rj["rayClusterSpec"]):
        assert {"secretRef": {"name": "vaepipe-env"}} in c["envFrom"], c["name"]
    submitter = containers(rj["submitterPodTemplate"])[0]
    assert any(e["name"] == "RAY_AUTH_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in submitter["env"])


def test_no_secret_is_written_in_a_manifest():
    for path in INFRA.rglob("*.yaml"):
        for c in containers(docs(path)):
            for e in c.get("env", []):
                assert not (e["name"] in SECRET_ENV and "value" in e), f"{path.name}: {e['name']} must come from a Secret"
    compose = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    assert "POSTGRES_PASSWORD=" not in compose and "password1234" not in compose


def test_mlflow_server_has_auth_postgres_s3_and_no_public_port():
    svc = docs(INFRA / "mlflow" / "docker-compose.yaml")[0]["services"]["mlflow"]
    command = " ".join(svc["command"])
    assert "--app-name basic-auth" in command and "postgresql://" in command and "--artifacts-destination \"s3://" in command
    assert svc["env_file"] and all(p.startswith("127.0.0.1:") for p in svc["ports"])
    assert kind(INFRA / "mlflow" / "k8s.yaml", "Service")["spec"]["type"] == "ClusterIP"
    env = {e["name"]: e for e in containers(docs(INFRA / "mlflow" / "k8s.yaml"))[0]["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://") and "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]
