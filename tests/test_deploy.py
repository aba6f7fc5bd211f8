"""deploy/: what can be checked without a container runtime or a cluster.

The manifests parse; their ports, probe service names and CLI settings agree with what the server
really does (the health names are asked of a live server); every container is limited and
non-root; the headless Service selects the worker pods; clients dial it with dns:///; the
Dockerfile's default target is the torch-free worker with an exec-form `augsvc serve` entry point.
Worker count from the cgroup CPU quota is tested in test_pool.py (default_workers).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.servers import health_status, serve

from augsvc import cli
from augsvc.server import SERVICE_NAME, ServerSettings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NAMESPACE = "augsvc"


def serve_defaults(monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """`augsvc serve`'s defaults with no AUGSVC_* variables set."""
    for name in [n for n in os.environ if n.startswith("AUGSVC_")]:
        monkeypatch.delenv(name)
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve"])


def serve_flags() -> set[str]:
    """Every AUGSVC_<FLAG> variable `augsvc serve` reads."""
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers(dest="command"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    names = {"AUGSVC_" + a.dest.upper() for a in sub._actions if a.dest not in ("help", "dataset")}
    # The repeatable --dataset reads a comma list from AUGSVC_DATASETS; the log level is main()'s.
    return names | {"AUGSVC_DATASETS", "AUGSVC_LOG_LEVEL"}


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = doc["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def probes(container: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        if kind in container:
            yield kind, container[kind]


# -- parsing --------------------------------------------------------------------------------------

def test_every_manifest_parses_and_is_namespaced() -> None:
    docs = documents()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job"} <= kinds
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    assert yaml.safe_load((K8S / "patches" / "tls.yaml").read_text())
    assert yaml.safe_load((DEPLOY / "compose.yaml").read_text())


# -- the worker Deployment agrees with the server ----------------------------------------------------

def test_ports_match_the_server_default(monkeypatch: pytest.MonkeyPatch) -> None:
    port = serve_defaults(monkeypatch).port
    assert port == 50051
    (worker,) = containers(find("Deployment", "augsvc-workers"))
    assert {p["name"]: p["containerPort"] for p in worker["ports"]}["grpc"] == port
    assert env_of(worker)["AUGSVC_PORT"] == str(port)
    for kind, probe in probes(worker):
        assert probe["grpc"]["port"] == port, kind
    service = find("Service", "augsvc-workers")
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == port and grpc_port["targetPort"] in (port, "grpc")


@pytest.fixture(scope="module")
def live_server() -> Iterator[Any]:
    with serve(ServerSettings(workers=1, datasets={})) as served:
        yield served


def test_probe_services_are_the_ones_the_server_registers(live_server: Any) -> None:
    (worker,) = containers(find("Deployment", "augsvc-workers"))
    kinds = dict(probes(worker))
    assert set(kinds) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in kinds.items():
        service = probe["grpc"].get("service", "")
        assert service in ("", SERVICE_NAME), f"{kind}: {service!r}"
        assert live_server.health(service) == "SERVING", f"{kind}: {service!r}"
    # Exec probes of the TLS variant ask the same names through `augsvc health`.
    patch = yaml.safe_load((K8S / "patches" / "tls.yaml").read_text())
    (tls_worker,) = patch["spec"]["template"]["spec"]["containers"]
    for kind, probe in probes(tls_worker):
        command = probe["exec"]["command"]
        assert probe["grpc"] is None and command[:2] == ["augsvc", "health"], kind
        service = command[command.index("--service") + 1]
        assert health_status(live_server.channel, service) == "SERVING", f"{kind}: {service!r}"


def test_the_worker_drains_on_rolling_updates() -> None:
    deployment = find("Deployment", "augsvc-workers")
    pod = deployment["spec"]["template"]["spec"]
    (worker,) = containers(deployment)
    grace = float(env_of(worker)["AUGSVC_GRACE"])
    pre_stop = worker["lifecycle"]["preStop"]
    pre_stop_seconds = (float(pre_stop["exec"]["command"][1]) if "exec" in pre_stop
                        else float(pre_stop["sleep"]["seconds"]))
    assert pod["terminationGracePeriodSeconds"] > pre_stop_seconds + grace
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_worker_environment_names_real_flags() -> None:
    known = serve_flags()
    (worker,) = containers(find("Deployment", "augsvc-workers"))
    patch = yaml.safe_load((K8S / "patches" / "tls.yaml").read_text())
    (tls_worker,) = patch["spec"]["template"]["spec"]["containers"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    names = set(env_of(worker)) | set(compose["services"]["worker"]["environment"])
    names |= {e["name"] for e in tls_worker["env"] if e["name"] != "AUGSVC_TLS_CA"}  # that one: health's
    assert names <= known, f"not read by augsvc serve: {sorted(names - known)}"
    env = env_of(worker)
    assert env["AUGSVC_HOST"] == "0.0.0.0" and env["AUGSVC_INSECURE"] == "1"  # plaintext only by choice
    assert "AUGSVC_TOKEN_FILE" in env


def test_secrets_are_wired_as_volumes_and_env() -> None:
    deployment = find("Deployment", "augsvc-workers")
    patch = yaml.safe_load((K8S / "patches" / "tls.yaml").read_text())

    def secret_paths(pod: dict[str, Any]) -> dict[str, str]:
        """secret name -> the directory it is mounted at in the first container."""
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        return {volumes[m["name"]]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]
                if m["name"] in volumes and m.get("readOnly")}

    pod = deployment["spec"]["template"]["spec"]
    token_dir = secret_paths(pod)["augsvc-token"]
    assert env_of(pod["containers"][0])["AUGSVC_TOKEN_FILE"].startswith(token_dir + "/")
    tls_pod = patch["spec"]["template"]["spec"]
    tls_dirs = secret_paths(tls_pod)
    tls_env = env_of(tls_pod["containers"][0])
    assert tls_env["AUGSVC_TLS_CERT"] == tls_dirs["augsvc-tls"] + "/tls.crt"
    assert tls_env["AUGSVC_TLS_KEY"] == tls_dirs["augsvc-tls"] + "/tls.key"
    assert tls_env["AUGSVC_TLS_CA"].startswith(tls_dirs["augsvc-ca"] + "/")
    assert {"name": "AUGSVC_INSECURE", "$patch": "delete"} in tls_pod["containers"][0]["env"]


# -- every pod: limits and non-root --------------------------------------------------------------------

@pytest.mark.parametrize("kind, name", [("Deployment", "augsvc-workers"), ("Job", "augsvc-train")])
def test_containers_are_limited_and_non_root(kind: str, name: str) -> None:
    doc = find(kind, name)
    pod = doc["spec"]["template"]["spec"]
    pod_security = pod.get("securityContext", {})
    for container in containers(doc):
        limits = container["resources"]["limits"]
        assert limits.get("cpu") and limits.get("memory"), container["name"]
        assert container["resources"]["requests"], container["name"]
        security = {**pod_security, **container.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, container["name"]
        assert security.get("runAsUser", 0) != 0, container["name"]
        assert security.get("allowPrivilegeEscalation") is False, container["name"]
        assert "ALL" in security.get("capabilities", {}).get("drop", []), container["name"]


def test_dockerfile_user_matches_the_manifests() -> None:
    users = re.findall(r"^USER\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert users and all(u.split(":")[0] not in ("0", "root") for u in users)
    (worker,) = containers(find("Deployment", "augsvc-workers"))
    uid = find("Deployment", "augsvc-workers")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert users[-1].split(":")[0] == str(uid) == str(worker["securityContext"]["runAsUser"])


# -- Service, HPA, PDB, Job ------------------------------------------------------------------------

def test_headless_service_selects_the_worker_pods() -> None:
    deployment = find("Deployment", "augsvc-workers")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = find("Service", "augsvc-workers")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = find("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = find("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = find("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "augsvc-workers"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilization is relative to requests: the worker must request CPU.
    (worker,) = containers(find("Deployment", "augsvc-workers"))
    assert worker["resources"]["requests"]["cpu"]


def test_trainer_job_dials_the_headless_service_with_dns() -> None:
    job = find("Job", "augsvc-train")
    (train,) = containers(job)
    command = train["command"]
    assert command[0] == "augsvc-train"
    target = command[command.index("--server") + 1]
    service = find("Service", "augsvc-workers")
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert target == f"dns:///{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{grpc_port}"
    # The NetworkPolicy admits the trainer's pods.
    policy = find("NetworkPolicy")
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert admitted.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    # The workers serve plaintext with a token: the trainer sends it only when told that is meant
    # (without --insecure its client refuses to send a token in clear text beyond its host).
    (worker,) = containers(find("Deployment", "augsvc-workers"))
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["AUGSVC_INSECURE"] == "1" and "AUGSVC_TOKEN_FILE" in env
    assert "--token-file" in command and "--insecure" in command and "--tls-ca" not in command
    from trainer_client import AugmentClient

    AugmentClient(target, token="t", insecure=True).close()
    with pytest.raises(ValueError, match="clear text"):
        AugmentClient(target, token="t")


# -- compose ----------------------------------------------------------------------------------------

def test_compose_trainer_reaches_every_worker_by_name() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    worker, trainer = services["worker"], services["trainer"]
    assert worker["build"]["target"] == "worker" and trainer["build"]["target"] == "trainer"
    assert worker["deploy"]["replicas"] > 1
    command = trainer["command"] if isinstance(trainer["command"], list) else shlex.split(trainer["command"])
    target = command[command.index("--server") + 1]
    assert target == f"dns:///worker:{worker['environment']['AUGSVC_PORT']}"
    assert trainer["depends_on"]["worker"]["condition"] == "service_healthy"
    env = worker["environment"]
    assert env["AUGSVC_HOST"] == "0.0.0.0" and env["AUGSVC_INSECURE"] == "1"
    data = [v for v in worker["volumes"] if re.search(r":/data(:|$)", v)]
    assert data and data[0].endswith(":/data:ro"), "datasets are mounted read-only"


def test_compose_file_is_valid_for_compose() -> None:
    """The Compose tool's own schema check, where one is installed (docker-compose, docker compose)."""
    tool = (["docker-compose"] if shutil.which("docker-compose")
            else ["docker", "compose"] if shutil.which("docker") else None)
    # A docker CLI without its compose plugin answers `docker compose ...` with "unknown command".
    if tool is None or subprocess.run([*tool, "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no docker-compose / docker compose here to validate deploy/compose.yaml with")
    done = subprocess.run([*tool, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], capture_output=True,
                          text=True, timeout=60, cwd=DEPLOY)
    assert done.returncode == 0, done.stderr


# -- Dockerfile --------------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined), in file order."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if match:
            current = stages.setdefault(match.group(1), [])
        current.append(line)
    return stages


def test_dockerfile_default_target_is_the_torch_free_worker() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "worker", "the last stage is what a plain build produces"
    assert stages["base"][0].split()[1] == "python:3.11-slim"
    # The worker's ancestry (FROM and COPY --from) never passes through the trainer stage.
    seen, todo = set(), ["worker"]
    while todo:
        stage = todo.pop()
        seen.add(stage)
        for line in stages[stage]:
            ref = re.match(r"FROM\s+(\S+)", line) or re.search(r"--from=(\S+)", line)
            if ref and ref.group(1) in stages and ref.group(1) not in seen:
                todo.append(ref.group(1))
    assert "trainer" not in seen
    for stage in seen:
        for line in stages[stage]:
            if line.startswith("RUN") and "pip install" in line:
                assert "torch" not in line.split("&&")[0] and "[train" not in line, line


def test_dockerfile_entrypoint_healthcheck_and_environment() -> None:
    worker = dockerfile_stages()["worker"]
    base = dockerfile_stages()["base"]
    entry = [line for line in worker if line.startswith("ENTRYPOINT")]
    assert entry == ['ENTRYPOINT ["augsvc", "serve"]'], "exec form: PID 1 is augsvc and gets SIGTERM"
    health = [line for line in worker if line.startswith("HEALTHCHECK")]
    assert len(health) == 1 and "augsvc health" in health[0]
    assert any("NO_ALBUMENTATIONS_UPDATE=1" in line for line in base if line.startswith("ENV"))
    assert any(line.startswith("USER") for line in worker)
    assert any(line.startswith("EXPOSE") and "50051" in line for line in worker)


def from_chain(stages: dict[str, list[str]], name: str) -> list[str]:
    """A stage and those it is built FROM (not COPY --from): whose files its image holds."""
    chain = []
    while name in stages and name not in chain:
        chain.append(name)
        name = stages[name][0].split()[1]
    return chain


def apt_packages(lines: list[str]) -> set[str]:
    """The packages the `apt-get install` commands of these instructions name."""
    found: set[str] = set()
    for line in lines:
        for command in line.split("&&"):
            words = command.split()
            if "apt-get" in words and "install" in words:
                found |= {w for w in words[words.index("install") + 1:] if not w.startswith(("-", "$"))}
    return found


def test_dockerfile_ships_the_region_module_without_a_compiler() -> None:
    """Both images decode JPEG regions (the optional C module): it is compiled in the wheel stage,
    which alone holds a compiler and headers, and a build fails rather than ship the slower fallback."""
    stages = dockerfile_stages()
    wheel = stages["wheel"]
    assert {"gcc", "libjpeg62-turbo-dev"} <= apt_packages(wheel)
    built = next(i for i, line in enumerate(wheel) if "pip wheel" in line)
    assert "augsvc/datasets/_jpegregion" in " ".join(wheel[built:]), "the wheel stage checks the wheel holds the module"
    for target in ("worker", "trainer"):
        chain = from_chain(stages, target)
        packages = set().union(*(apt_packages(stages[stage]) for stage in chain))
        assert "wheel" not in chain and "libjpeg62-turbo" in packages, target
        assert not {p for p in packages if p.endswith("-dev") or p.startswith(("gcc", "build-essential"))}, target
        assert any(line.startswith("RUN") and "regions_available()" in line for line in stages[target]), target
    for line in (line for stage in stages.values() for line in stage):
        if "apt-get install" in line:
            assert "--no-install-recommends" in line and "rm -rf /var/lib/apt/lists" in line, line
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "!setup.py" in ignore, "setup.py (which builds the module) must be in the build context: .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "an allow-list"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert {"pyproject.toml", "augsvc", "trainer_client"} <= allowed
    assert not allowed & {".venv", ".git", "runs", "tests"}
