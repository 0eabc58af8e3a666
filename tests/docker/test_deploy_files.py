"""docker/: the image, the compose file and the Kubernetes manifests carry what sharing needs.

``docker compose`` and ``kubectl`` are not available here, so these tests read the files
and check them against the code they run: probe paths are real routes of the app, the
daemon's arguments parse with ckptd's own CLI, every ``CKPTD_*`` variable names a real
setting, and the daemon and its workers agree on socket, IPC namespace, uid and paths.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptd._cli import build_parser
from ckptd.server import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
CLIENT_VARIABLES = {"CKPTD_URL", "CKPTD_TOKEN"}


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


def test_dockerfile_base_user_healthcheck_entrypoint() -> None:
    steps = _dockerfile()
    args = dict(part.split("=", 1) for op, rest in steps if op == "ARG" for part in [rest] if "=" in part)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert steps[[op for op, _ in steps].index("FROM")][1] == "${CUDA_IMAGE}"
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert 'pip install ".[server,gpu]"' in runs
    (user,) = [rest for op, rest in steps if op == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    (health,) = [rest for op, rest in steps if op == "HEALTHCHECK"]
    assert health.endswith('CMD ["ckptd", "health"]')
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


# --- compose --------------------------------------------------------------------------


def _mount_target(spec: str) -> str:
    """The container path of ``SOURCE:TARGET[:MODE]`` (SOURCE may hold ``${VAR:-default}``)."""
    parts = spec.split(":")
    return parts[-2] if parts[-1] in ("ro", "rw") else parts[-1]


def test_compose_daemon_and_two_workers_share_socket_ipc_uid_and_paths() -> None:
    compose = _yaml("compose.yaml")
    services = compose["services"]
    daemon = services["ckptd"]
    workers = [s for name, s in services.items() if name != "ckptd"]
    assert len(workers) >= 2
    socket = daemon["environment"]["CKPTD_SOCKET"]
    _check_variables(daemon["environment"])
    assert daemon["ipc"] == "shareable" and daemon["healthcheck"]["test"] == ["CMD", "ckptd", "health"]
    assert daemon["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    daemon_mounts = {_mount_target(v): v for v in daemon["volumes"]}
    socket_dir = str(Path(socket).parent)
    assert socket_dir in daemon_mounts and daemon_mounts["/checkpoints"].endswith(":ro")
    volume = daemon_mounts[socket_dir].split(":")[0]
    assert volume in compose["volumes"]
    for worker in workers:
        _check_variables(worker["environment"])
        assert worker["ipc"] == "service:ckptd" and worker["build"] == daemon["build"]
        assert worker["user"] == daemon["user"]  # the socket and arenas are owner-only
        assert worker["environment"]["CKPTD_URL"] == f"unix://{socket}"
        assert worker["depends_on"]["ckptd"]["condition"] == "service_healthy"
        assert f"{volume}:{socket_dir}" in worker["volumes"]
        assert daemon_mounts["/checkpoints"] in worker["volumes"]  # same files at the same path, read-only
        script = worker["entrypoint"][1]
        assert script.startswith("/examples/") and (REPO / "examples" / Path(script).name).is_file()
        assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_user_is_the_image_user() -> None:
    (user,) = [rest for op, rest in _dockerfile() if op == "USER"]
    assert _yaml("compose.yaml")["services"]["ckptd"]["user"] == user


# --- Kubernetes -----------------------------------------------------------------------


def _pod(name: str) -> dict[str, Any]:
    return _yaml(f"k8s/{name}")["spec"]["template"]


def test_kustomization_lists_existing_files() -> None:
    for resource in _yaml("k8s/kustomization.yaml")["resources"]:
        assert (DOCKER / "k8s" / resource).is_file(), resource


def test_daemonset() -> None:
    manifest = _yaml("k8s/daemonset.yaml")
    assert manifest["kind"] == "DaemonSet"
    pod = manifest["spec"]["template"]
    spec = pod["spec"]
    assert spec["hostIPC"] is True
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

    assert {"cpu", "memory"} <= set(container["resources"]["limits"]) and container["resources"]["requests"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["run"] == str(Path(env["CKPTD_SOCKET"]).parent)
    assert volumes["run"]["hostPath"]["path"] == "/run/ckptd"
    assert mounts["checkpoints"] == env["CKPTD_ROOTS"]
    assert mounts["token"] == str(Path(args.token_file).parent)


def test_worker_deployment_matches_the_daemon() -> None:
    daemon, worker = _pod("daemonset.yaml")["spec"], _pod("worker-deployment.yaml")["spec"]
    assert worker["hostIPC"] is True
    assert worker["securityContext"]["runAsUser"] == daemon["securityContext"]["runAsUser"]
    (d,) = daemon["containers"]
    (w,) = worker["containers"]
    socket = {e["name"]: e["value"] for e in d["env"]}["CKPTD_SOCKET"]
    assert {e["name"]: e["value"] for e in w["env"]}["CKPTD_URL"] == f"unix://{socket}"
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


@pytest.mark.parametrize("name", ["compose.yaml", "k8s/daemonset.yaml", "k8s/worker-deployment.yaml"])
def test_images_are_the_one_built(name: str) -> None:
    text = (DOCKER / name).read_text()
    images = {line.split("image:", 1)[1].strip() for line in text.splitlines() if "image:" in line}
    assert images == {"ckptd:0.1.0"}
