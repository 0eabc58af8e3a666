"""docker/: the image, the compose files and the Kubernetes manifests carry what sharing needs.

``docker compose`` and ``kubectl`` are not available here, so these tests read the files
and check them against the code they run: probe paths are real routes of the app, the
daemon's arguments parse with ckptd's own CLI, every ``CKPTD_*`` variable names a real
setting, and the daemon and its workers agree on socket, namespaces, uid and paths.
CPU arenas are anonymous memfds handed over the descriptor socket beside the daemon's
(so only the socket directory and the uid are shared, and the daemon's memory limit, not
a /dev/shm size, holds the host budget); the IPC and PID namespaces are shared exactly
where CUDA IPC needs them.
Every Kubernetes manifest is validated against the API's schemas (kubernetes-validate,
strict), and the rules a platform's admission and scanners apply (checkov's, GKE's
quota admission) are checked here one by one.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

import ckptd
from ckptd._cli import build_parser
from ckptd.server import Settings, load_settings
from ckptd.server._fdchannel import fd_socket_path

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
CLIENT_VARIABLES = {"CKPTD_URL", "CKPTD_TOKEN"}
K8S = DOCKER / "k8s"
PROCESS_BYTES = 4 * 2**30  # the daemon process itself: the interpreter, torch, the staging pool


def _yaml(name: str) -> Any:
    return yaml.safe_load((DOCKER / name).read_text())


def _check_variables(env: dict[str, str]) -> None:
    fields = {f"CKPTD_{name.upper()}" for name in Settings.model_fields}
    unknown = {k for k in env if k.startswith("CKPTD_")} - fields - CLIENT_VARIABLES
    assert not unknown, f"not ckptd settings: {unknown}"


def _app_routes() -> set[str]:
    from ckptd.server._app import create_app
    from ckptd.server._metrics import Metrics
    from ckptd.server import load_settings

    settings = load_settings(roots=[str(REPO)], shm_dir=str(REPO), socket="/tmp/ckptd-routes.sock")
    app = create_app(object(), settings, Metrics())  # type: ignore[arg-type]  # routes only; never called
    return {route.path for route in app.routes}


# --- Dockerfile -----------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in _dockerfile():
        if op == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(rest))
    return env


def _dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in _dockerfile() if op == "ARG" and "=" in rest)


def test_dockerfile_base_user_healthcheck_entrypoint() -> None:
    steps = _dockerfile()
    args = _dockerfile_args()
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["BASE_IMAGE"]
    assert steps[[op for op, _ in steps].index("FROM")][1] == "${BASE_IMAGE}"
    assert args["EXTRAS"] == "server,gpu"  # the CUDA image by default
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert 'pip install ".[${EXTRAS}]"' in runs
    (user,) = [rest for op, rest in steps if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (health,) = [rest for op, rest in steps if op == "HEALTHCHECK"]
    assert health.endswith('CMD ["ckptd", "health"]')
    assert _seconds(re.search(r"--timeout=(\w+)", health).group(1)) >= 5  # type: ignore[union-attr]  # a Python start-up
    (entry,) = [rest for op, rest in steps if op == "ENTRYPOINT"]
    assert entry == '["ckptd", "serve"]'
    _check_variables(_dockerfile_env())
    assert _dockerfile_env()["CKPTD_URL"] == "unix://" + _dockerfile_env()["CKPTD_SOCKET"]  # `ckptd health` finds it


def test_dockerfile_copies_every_package_folder() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {rest.split()[0] for op, rest in _dockerfile() if op == "COPY"}
    assert folders <= copied and {"pyproject.toml", "examples"} <= copied


def test_healthz_is_a_route() -> None:
    assert {"/healthz", "/metrics"} <= _app_routes()


def _seconds(duration: str) -> float:
    """A compose/Docker duration (``10s``, ``1m30s``) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


# --- compose --------------------------------------------------------------------------

USER = "${CKPTD_UID:-10001}:${CKPTD_GID:-10001}"


def _mount_target(spec: str) -> str:
    """The container path of ``SOURCE:TARGET[:MODE]`` (SOURCE may hold ``${VAR:-default}``)."""
    parts = spec.split(":")
    return parts[-2] if parts[-1] in ("ro", "rw") else parts[-1]


def _mount_source(spec: str) -> str:
    return spec[: spec.index(":" + _mount_target(spec))]


def _compose_parts() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """compose.yaml, its daemon, its workers and its prepare service."""
    compose = _yaml("compose.yaml")
    services = compose["services"]
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert set(services) == {"prepare", "ckptd"} | {f"worker-{i}" for i in range(1, len(workers) + 1)}
    return compose, services["ckptd"], workers, services["prepare"]


def test_compose_daemon_and_two_workers_share_socket_uid_and_paths() -> None:
    compose, daemon, workers, _ = _compose_parts()
    assert len(workers) >= 2
    socket = daemon["environment"]["CKPTD_SOCKET"]
    _check_variables(daemon["environment"])
    assert fd_socket_path(Path(socket)).parent == Path(socket).parent  # one volume holds both sockets
    assert daemon["healthcheck"]["test"] == ["CMD", "ckptd", "health"]
    assert _seconds(daemon["healthcheck"]["timeout"]) >= 5
    assert daemon["build"]["context"] == ".." and daemon["build"]["dockerfile"] == "docker/Dockerfile"
    daemon_mounts = {_mount_target(v): v for v in daemon["volumes"]}
    socket_dir = str(Path(socket).parent)
    assert socket_dir in daemon_mounts and daemon_mounts["/checkpoints"].endswith(":ro")
    volume = daemon_mounts[socket_dir].split(":")[0]
    assert volume in compose["volumes"]
    for worker in workers:
        _check_variables(worker["environment"])
        assert worker["build"] == daemon["build"]
        assert worker["image"] == daemon["image"]  # one image, built once
        assert worker["user"] == daemon["user"]  # the socket and arenas are owner-only
        assert worker["environment"]["CKPTD_URL"] == f"unix://{socket}"
        assert "CKPTD_TOKEN" not in worker["environment"]  # the owner-only socket needs none
        assert worker["depends_on"]["ckptd"]["condition"] == "service_healthy"
        assert f"{volume}:{socket_dir}" in worker["volumes"]
        assert daemon_mounts["/checkpoints"] in worker["volumes"]  # same files at the same path, read-only
        script = worker["entrypoint"][1]
        assert script.startswith("/examples/") and (REPO / "examples" / Path(script).name).is_file()


def test_compose_is_cpu_only_and_builds_a_cpu_image() -> None:
    """A laptop without NVIDIA's runtime can run it: no GPU reservation, a CPU torch."""
    compose, daemon, _, _ = _compose_parts()
    assert "deploy" not in (DOCKER / "compose.yaml").read_text().split("services:", 1)[1]
    for service in compose["services"].values():
        assert "deploy" not in service and "runtime" not in service
    args = daemon["build"]["args"]
    assert set(args) <= set(_dockerfile_args())  # only ARGs the Dockerfile declares
    assert args["TORCH_INDEX"].endswith("/whl/cpu") and "gpu" not in args["EXTRAS"].split(",")
    assert "cuda" not in args["BASE_IMAGE"]


def test_compose_gpu_overlay_reserves_gpus_for_daemon_and_workers() -> None:
    base = _yaml("compose.yaml")["services"]
    overlay = _yaml("compose.gpu.yaml")["services"]
    assert set(overlay) <= set(base)
    images = {service["image"] for service in overlay.values()}
    assert len(images) == 1 and images != {base["ckptd"]["image"]}  # one image, not the CPU one
    for name, service in overlay.items():
        assert set(service["build"]["args"]) <= set(_dockerfile_args())
        assert "gpu" in service["build"]["args"]["EXTRAS"].split(",")
        if name == "prepare":
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert {"ckptd", "worker-1", "worker-2"} <= set(overlay)


def test_compose_runs_as_the_host_user_given() -> None:
    """Files a user saved 0600 (transformers 5 does) are readable by a daemon running as that user."""
    compose, daemon, workers, prepare = _compose_parts()
    assert daemon["user"] == USER and all(worker["user"] == USER for worker in workers)
    uid, gid = re.fullmatch(r"\$\{(\w+):-10001\}:\$\{(\w+):-10001\}", USER).groups()  # type: ignore[union-attr]
    assert prepare["environment"] == {uid: "${%s:-10001}" % uid, gid: "${%s:-10001}" % gid}
    (user,) = [rest for op, rest in _dockerfile() if op == "USER"]
    assert user == "10001:10001"  # the variables' default is the image's user


def test_compose_prepare_makes_the_folders_and_the_demo_checkpoint() -> None:
    """The checkpoints folder need not exist; the socket volume belongs to the chosen uid."""
    _, daemon, workers, prepare = _compose_parts()
    assert daemon["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert prepare["user"] == "0:0" and prepare["restart"] == "no"
    mounts = {_mount_target(v): v for v in prepare["volumes"]}
    daemon_mounts = {_mount_target(v): v for v in daemon["volumes"]}
    assert mounts["/checkpoints"] == _mount_source(daemon_mounts["/checkpoints"]) + ":/checkpoints"  # writable
    socket_dir = str(Path(daemon["environment"]["CKPTD_SOCKET"]).parent)
    assert mounts[socket_dir] == daemon_mounts[socket_dir]
    script = prepare["entrypoint"][-1]
    assert f'install -d -m 0700 -o "$$CKPTD_UID" -g "$$CKPTD_GID" {socket_dir}' in script
    for worker in workers:
        checkpoint = worker["entrypoint"][-1]
        assert f"[ -e {checkpoint} ]" in script and f"/examples/worker.py save {checkpoint}" in script
    assert '--reuid="$$CKPTD_UID"' in script  # written as the user, not as root


def test_compose_user_is_the_image_user() -> None:
    (user,) = [rest for op, rest in _dockerfile() if op == "USER"]
    uid, gid = user.split(":")
    assert _yaml("compose.yaml")["services"]["ckptd"]["user"] == f"${{CKPTD_UID:-{uid}}}:${{CKPTD_GID:-{gid}}}"


def _compose_services(name: str) -> dict[str, Any]:
    return _yaml(name)["services"]


def test_compose_shares_namespaces_only_where_cuda_ipc_needs_them() -> None:
    """CPU arenas are memfds passed over the descriptor socket: the CPU compose shares no
    IPC or PID namespace. The GPU overlay shares the daemon's IPC and PID namespaces with
    the workers (CUDA IPC handles do not open across PID namespaces)."""
    for service in _compose_services("compose.yaml").values():
        assert "ipc" not in service and "pid" not in service
    overlay = _compose_services("compose.gpu.yaml")
    assert overlay["ckptd"]["ipc"] == "shareable" and "pid" not in overlay["ckptd"]
    workers = [s for name, s in overlay.items() if name.startswith("worker")]
    assert len(workers) >= 2
    for worker in workers:
        assert worker["ipc"] == "service:ckptd" and worker["pid"] == "service:ckptd"
    assert "ipc" not in overlay["prepare"] and "pid" not in overlay["prepare"]


def _compose_budgets(*names: str) -> tuple[dict[str, str], float]:
    """The daemon's environment and mem_limit (bytes) once the compose files are merged."""
    env: dict[str, str] = {}
    limit = ""
    for name in names:
        daemon = _compose_services(name)["ckptd"]
        env.update(daemon.get("environment", {}))
        limit = daemon.get("mem_limit", limit)
        assert "shm_size" not in daemon, f"{name}: memfd arenas are not in /dev/shm; shm_size limits nothing of theirs"
    assert limit, f"{names}: the daemon needs a memory limit that holds its budgets"
    return env, _quantity(limit.replace("g", "Gi").replace("m", "Mi"))


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")])
def test_compose_daemon_memory_limit_holds_its_budgets(
    files: tuple[str, ...], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """memfd pages are charged to the daemon that writes them and no tmpfs size bounds
    them: the daemon's mem_limit holds the host budget (and the host tier, when GPUs have
    one) plus the process."""
    env, limit = _compose_budgets(*files)
    for key in [k for k in os.environ if k.startswith("CKPTD_")]:
        monkeypatch.delenv(key)
    settings = load_settings(
        roots=[tmp_path], shm_dir=tmp_path, socket="/tmp/ckdeploy/d.sock",
        host_budget=env["CKPTD_HOST_BUDGET"], host_tier_budget=env.get("CKPTD_HOST_TIER_BUDGET", "0"),
    )  # fmt: skip
    if "compose.gpu.yaml" in files:
        assert "CKPTD_HOST_TIER_BUDGET" in env  # its default is a share of RAM, unbounded by the limit
    assert limit >= settings.host_budget + settings.host_tier_budget + PROCESS_BYTES


def test_docker_files_do_not_put_host_arenas_in_dev_shm() -> None:
    """--shm-dir only holds simulated GPUs' memory: the real deployments neither set it
    nor size /dev/shm for the host budget."""
    assert "CKPTD_SHM_DIR" not in _dockerfile_env()
    for name in ("compose.yaml", "compose.gpu.yaml"):
        for service in _compose_services(name).values():
            assert "shm_size" not in service and "CKPTD_SHM_DIR" not in service.get("environment", {}), name
            assert "/dev/shm" not in {_mount_target(v) for v in service.get("volumes", [])}, name
    for name in ("daemonset.yaml", "worker-deployment.yaml"):
        for container in _containers(_pod(name)["spec"]):
            assert "CKPTD_SHM_DIR" not in {e["name"] for e in container.get("env", [])}, name
            assert "/dev/shm" not in {m["mountPath"] for m in container.get("volumeMounts", [])}, name


# --- Kubernetes -----------------------------------------------------------------------

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # the oldest and newest the validator knows that we support


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text()) if doc
    ]  # fmt: skip


def _pod(name: str) -> dict[str, Any]:
    return _yaml(f"k8s/{name}")["spec"]["template"]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def _quantity(text: str | int) -> float:
    """A Kubernetes quantity (``64Gi``, ``500M``, ``250m``, ``4``) as a number."""
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}
    number, suffix = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text)).groups()  # type: ignore[union-attr]
    return float(number) * (suffixes[suffix] if suffix else 1)


def test_kustomization_lists_every_manifest() -> None:
    resources = _yaml("k8s/kustomization.yaml")["resources"]
    assert sorted(resources) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert resources.index("namespace.yaml") == 0


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    for name, doc in _k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) is not valid for Kubernetes {version}: {str(exc).splitlines()[0]}")


def test_daemonset() -> None:
    manifest = _yaml("k8s/daemonset.yaml")
    assert manifest["kind"] == "DaemonSet"
    pod = manifest["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostIPC"] is True and spec["hostPID"] is True  # CUDA IPC (GPU nodes only)
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    _check_variables(env)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and spec["runtimeClassName"] == "nvidia"

    args = build_parser().parse_args(["serve", *container["args"]])  # ckptd's own CLI accepts them
    assert args.public_metrics and args.token_file  # TCP has a token; Prometheus scrapes without one
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port

    routes = _app_routes()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and get["path"] == "/healthz"  # the one route without a token
        assert get["port"] in ports
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == args.port and notes["prometheus.io/path"] in routes

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["run"] == str(Path(env["CKPTD_SOCKET"]).parent)
    assert volumes["run"]["hostPath"]["path"] == "/run/ckptd"
    assert mounts["checkpoints"] == env["CKPTD_ROOTS"]
    assert mounts["token"] == str(Path(args.token_file).parent)


def test_daemonset_prepares_the_hostpath_socket_directory_as_root() -> None:
    """The kubelet makes the hostPath directory root-owned and fsGroup skips hostPath: a root
    init container hands it to the daemon's uid before the non-root daemon binds there."""
    spec = _pod("daemonset.yaml")["spec"]
    uid, gid = spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]
    (daemon,) = spec["containers"]
    socket_dir = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}["run"]
    (init,) = [c for c in spec["initContainers"] if {"name": "run", "mountPath": socket_dir} in c["volumeMounts"]]
    assert init["securityContext"]["runAsUser"] == 0 and init["securityContext"]["runAsNonRoot"] is False
    assert set(init["securityContext"]["capabilities"]["add"]) <= {"CHOWN", "FOWNER"}
    assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert f"chown {uid}:{gid} {socket_dir}" in init["command"][-1]
    assert init.get("image", "").split(":")[0] == daemon["image"].split(":")[0]


def test_daemon_memory_is_guaranteed_and_holds_its_budgets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Guaranteed QoS (requests = limits for cpu and memory in every container) and a memory
    limit that holds the host budget, the host tier and the process itself."""
    spec = _pod("daemonset.yaml")["spec"]
    for container in _containers(spec):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]
        assert resources["requests"] == resources["limits"], container["name"]
    (daemon,) = spec["containers"]
    env = {e["name"]: e["value"] for e in daemon["env"]}
    for key in [k for k in os.environ if k.startswith("CKPTD_")]:
        monkeypatch.delenv(key)
    settings = load_settings(
        roots=[tmp_path], shm_dir=tmp_path, socket="/tmp/ckdeploy/d.sock",
        host_budget=env["CKPTD_HOST_BUDGET"], host_tier_budget=env["CKPTD_HOST_TIER_BUDGET"],
    )  # fmt: skip
    limit = _quantity(daemon["resources"]["limits"]["memory"])
    assert limit >= settings.host_budget + settings.host_tier_budget + PROCESS_BYTES


def test_pods_are_hardened_and_tolerate_service_links() -> None:
    """What checkov and GKE's admission ask for, in the daemon's pod and the workers'."""
    priority_classes = {doc["metadata"]["name"]: doc for _, doc in _k8s_documents() if doc["kind"] == "PriorityClass"}
    for name in ("daemonset.yaml", "worker-deployment.yaml"):
        spec = _pod(name)["spec"]
        assert spec["enableServiceLinks"] is False, name  # no CKPTD_SERVICE_HOST, CKPTD_PORT=tcp://...
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("priorityClassName", "").startswith("system-"), name  # kube-system only on GKE
        for container in _containers(spec):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"] and container["resources"]["requests"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    # the default is 1 s; `ckptd health` is a Python start-up (seconds)
                    timeout = container[probe].get("timeoutSeconds", 1)
                    assert timeout >= (10 if "exec" in container[probe] else 5), (name, probe)
                    assert container[probe].get("periodSeconds", 10) >= timeout, (name, probe)
    priority = _pod("daemonset.yaml")["spec"]["priorityClassName"]
    assert priority in priority_classes and 0 < priority_classes[priority]["value"] < 1_000_000_000


def test_network_policy_guards_the_tcp_port() -> None:
    (policy,) = [doc for _, doc in _k8s_documents() if doc["kind"] == "NetworkPolicy"]
    pod = _pod("daemonset.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (container,) = pod["spec"]["containers"]
    ports = {(p["protocol"], p["containerPort"]) for p in container["ports"]}
    allowed = {(p["protocol"], p["port"]) for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == ports
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])  # never from anywhere


def test_worker_deployment_matches_the_daemon() -> None:
    daemon, worker = _pod("daemonset.yaml")["spec"], _pod("worker-deployment.yaml")["spec"]
    assert worker["hostIPC"] is True and worker["hostPID"] is True  # CUDA IPC: the worker has a GPU
    assert "nvidia.com/gpu" in worker["containers"][0]["resources"]["limits"]
    assert worker["securityContext"]["runAsUser"] == daemon["securityContext"]["runAsUser"]
    assert worker["securityContext"]["runAsGroup"] == daemon["securityContext"]["runAsGroup"]
    (d,) = daemon["containers"]
    (w,) = worker["containers"]
    d_env = {e["name"]: e["value"] for e in d["env"]}
    w_env = {e["name"]: e.get("value") for e in w["env"]}
    assert w_env["CKPTD_URL"] == f"unix://{d_env['CKPTD_SOCKET']}"
    # The daemon has a token (TCP); the worker talks over the owner-only socket, which needs none.
    assert "--token-file" in d["args"] and "CKPTD_TOKEN" not in w_env
    d_volumes = {v["name"]: v for v in daemon["volumes"]}
    w_volumes = {v["name"]: v for v in worker["volumes"]}
    assert w_volumes["run"]["hostPath"]["path"] == d_volumes["run"]["hostPath"]["path"]
    assert w_volumes["checkpoints"]["persistentVolumeClaim"] == d_volumes["checkpoints"]["persistentVolumeClaim"]
    w_mounts = {m["name"]: m for m in w["volumeMounts"]}
    d_mounts = {m["name"]: m for m in d["volumeMounts"]}
    assert w_mounts["run"]["mountPath"] == d_mounts["run"]["mountPath"]
    assert w_mounts["checkpoints"] == d_mounts["checkpoints"] and w_mounts["checkpoints"]["readOnly"] is True
    assert w["readinessProbe"]["exec"]["command"] == ["ckptd", "health"]
    assert (REPO / "examples" / Path(w["command"][1]).name).is_file()


def test_images_come_from_a_registry_set_in_one_place() -> None:
    """Manifests name the image ``ckptd``; the kustomization points it at a registry."""
    images = {c["image"] for name in ("daemonset.yaml", "worker-deployment.yaml") for c in _containers(_pod(name)["spec"])}
    assert images == {"ckptd"}
    (image,) = _yaml("k8s/kustomization.yaml")["images"]
    assert image["name"] == "ckptd" and image["newTag"] == ckptd.__version__
    registry = image["newName"].split("/")[0]
    assert "." in registry or ":" in registry, "a registry host, not a Docker Hub short name"


def test_readme_creates_the_namespace_before_the_secret() -> None:
    text = (REPO / "README.md").read_text()
    namespace = text.index("kubectl apply -f docker/k8s/namespace.yaml")
    assert namespace < text.index("kubectl -n ckptd create secret") < text.index("kubectl apply -k docker/k8s")
    assert "kustomize edit set image ckptd=" in text


def test_readme_deployment_agrees_with_the_files() -> None:
    """The Deployment section says what the files now do: the descriptor socket in the
    shared socket directory, a memory limit (not /dev/shm) for the host budget, the
    namespaces CUDA IPC needs."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Deployment") : text.index("\n## ", text.index("## Deployment") + 1)]
    assert "<socket>.fd" in section and "mem_limit" in section
    assert "`shm_size` for the host budget" not in section and "IPC namespace\nand `/dev/shm`" not in section
    spec = _pod("daemonset.yaml")["spec"]
    for key in ("hostIPC", "hostPID"):
        assert spec[key] is True and f"`{key}`" in section
    gpu_worker = _compose_services("compose.gpu.yaml")["worker-1"]
    assert gpu_worker["ipc"] == gpu_worker["pid"] == "service:ckptd" and "service:ckptd" in section


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="runs the step as root, as compose does")
def test_compose_prepare_script_hands_the_folders_to_the_user() -> None:
    """The prepare step's own shell, run here as root (as compose runs it) on stand-in
    folders: docker's freshly made (root-owned, empty) checkpoints folder and the socket
    volume end up the user's, and the demo checkpoint is written as the user, once.
    (Only the payload differs: a stand-in for `python /examples/worker.py save`.)"""
    _, _, _, prepare = _compose_parts()
    base = Path(tempfile.mkdtemp(prefix="ckprep", dir="/tmp"))
    try:
        base.chmod(0o755)
        run, checkpoints = base / "run", base / "checkpoints"
        checkpoints.mkdir()  # as docker creates a missing bind source: root's, empty
        script = (
            prepare["entrypoint"][-1].replace("$$", "$")
            .replace("/run/ckptd", str(run)).replace("/checkpoints", str(checkpoints))
            .replace("python /examples/worker.py save", "sh -c 'echo demo > \"$1\"' -")
        )  # fmt: skip
        env = {"PATH": os.environ["PATH"], "CKPTD_UID": "10001", "CKPTD_GID": "10002"}
        for _ in range(2):  # a second `up` changes nothing
            done = subprocess.run(["sh", "-euc", script], env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            for path, mode in ((run, 0o700), (checkpoints, 0o755), (checkpoints / "tinylm.pt", None)):
                st = path.stat()
                assert (st.st_uid, st.st_gid) == (10001, 10002), path
                assert mode is None or st.st_mode & 0o777 == mode, path
        assert (checkpoints / "tinylm.pt").read_text() == "demo\n"

        mine = base / "mine"  # the user's own folder, not empty: never chowned
        mine.mkdir()
        (mine / "tinylm.pt").write_text("mine")
        script = script.replace(str(checkpoints), str(mine))
        assert subprocess.run(["sh", "-euc", script], env=env, timeout=60).returncode == 0
        assert mine.stat().st_uid == 0 and (mine / "tinylm.pt").read_text() == "mine"
    finally:
        shutil.rmtree(base, ignore_errors=True)
