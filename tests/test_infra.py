"""infra/ does not rot: every manifest and config parses, and what it names (modules, arguments, serve args,
secrets, ports, images, package source) exists in this repository and agrees with the CLIs and with each other."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p) if d["kind"] == kind]


def _one(kind: str) -> dict[str, Any]:
    (doc,) = _kind(kind)
    return doc


def _cluster_specs() -> dict[str, dict[str, Any]]:
    """Every Ray cluster spec in the manifests: the RayCluster's and the RayService's."""
    return {"RayCluster": _one("RayCluster")["spec"], "RayService": _one("RayService")["spec"]["rayClusterConfig"]}


def _pod_specs() -> list[dict[str, Any]]:
    return [
        group["template"]["spec"]
        for spec in _cluster_specs().values()
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    ]


def _containers() -> list[dict[str, Any]]:
    return [c for pod in _pod_specs() for c in pod["containers"]]


def _gpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in spec["workerGroupSpecs"]]
    (group,) = [g for g, lim in zip(spec["workerGroupSpecs"], limits) if "nvidia.com/gpu" in lim]
    return group


def _commands(entrypoint: str) -> list[list[str]]:
    """A RayJob entrypoint as its commands: `cmd && cmd ...` -> [argv, argv]."""
    return [shlex.split(part) for part in entrypoint.split("&&")]


def _module_args(argv: list[str]) -> tuple[str, list[str]]:
    assert argv[:2] == ["python", "-m"], f"entrypoint should be `python -m MODULE ...`: {argv}"
    return argv[2], argv[3:]


def _parse_cli(module: str, args: list[str]) -> Any:
    """Parse `args` with the module's own CLI parser (fails the test on an unknown or bad argument)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if module == "sdm":
        path = ROOT / "sdm/__main__.py"
    assert path.exists(), f"{module} names no module in the repository"
    try:
        if module == "sdm":
            from sdm.cli import build_parser

            return build_parser().parse_args(args)
        return importlib.import_module(module).parse_args(args)
    except SystemExit:
        pytest.fail(f"{module} rejects the arguments {args}")


def _entrypoint(name: str) -> list[tuple[str, Any]]:
    """[(module, parsed args)] for each command of the RayJob's entrypoint."""
    (job,) = [j for j in _kind("RayJob") if j["metadata"]["name"] == name]
    return [(m, _parse_cli(m, a)) for m, a in map(_module_args, _commands(job["spec"]["entrypoint"]))]


def _serve_configs() -> dict[str, dict[str, Any]]:
    return {
        "serve/config.yaml": yaml.safe_load((ROOT / "serve/config.yaml").read_text()),
        "rayservice.yaml": yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"]),
    }


# --- everything parses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in INFRA.rglob("*.y*ml")))
def test_every_yaml_file_parses_and_kuberay_uses_ray_io_v1(path):
    docs = _docs(ROOT / path)
    assert docs, f"{path} is empty"
    for d in docs:
        if d.get("kind") in ("RayCluster", "RayJob", "RayService"):
            assert d["apiVersion"] == "ray.io/v1", path


def test_the_kuberay_folder_holds_a_cluster_two_jobs_a_service_and_the_secret():
    kinds = sorted(d["kind"] for p in KUBERAY.glob("*.yaml") for d in _docs(p))
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService", "Secret"]
    jobs = {j["metadata"]["name"]: j["spec"]["entrypoint"] for j in _kind("RayJob")}
    assert "jobs.train" in jobs["sdm-train"] and "jobs.generate" in jobs["sdm-generate"]


def test_the_grafana_dashboard_is_json_and_queries_only_metrics_the_app_exports():
    dashboard = json.loads((INFRA / "grafana/sdm-serve-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs
    source = (ROOT / "serve/metrics.py").read_text()
    suffixes = {"Counter": ["_total"], "Histogram": ["_bucket", "_sum", "_count"], "Gauge": [""]}
    exported = {
        f"ray_{name}{s}" for kind, name in re.findall(r"(Counter|Histogram|Gauge)\(\s*\"(\w+)\"", source) for s in suffixes[kind]
    }
    used = {name for e in exprs for name in re.findall(r"\bray_sdm_\w+", e)}
    assert used and used <= exported, f"the dashboard queries metrics the app does not export: {used - exported}"


def test_promtool_accepts_the_scrape_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed; `make system-deps` installs it")
    r = subprocess.run([promtool, "check", "config", str(INFRA / "prometheus/prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the cluster -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["RayCluster", "RayService"])
def test_a_cpu_head_and_an_autoscaling_gpu_worker_group(which):
    spec = _cluster_specs()[which]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head should schedule no work"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu = _gpu_group(spec)
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


def test_the_rayservice_runs_on_the_same_cluster_spec_as_the_raycluster():
    specs = _cluster_specs()
    assert specs["RayService"] == specs["RayCluster"]


def test_every_ray_pod_gets_the_object_store_settings_from_the_secret():
    secret = _one("Secret")
    keys = set(secret["stringData"])
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= keys
    assert all(k.startswith("AWS_") for k in keys), "sdm.storage reads only the standard AWS settings"
    for c in _containers():
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs == [secret["metadata"]["name"]], f"container {c['name']} lacks envFrom the Secret"


def test_one_image_everywhere_tagged_with_the_package_version():
    images = {c["image"] for c in _containers()}
    images.add(yaml.safe_load((INFRA / "ray-up/aws-gpu.yaml").read_text())["docker"]["image"])
    (image,) = images
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]


def test_ray_version_matches_the_image_and_the_package_requirement():
    from packaging.requirements import Requirement

    versions = {spec["rayVersion"] for spec in _cluster_specs().values()}
    (version,) = versions
    arg = re.search(r"^ARG RAY_VERSION=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M)
    assert arg and arg.group(1) == version, "infra/Dockerfile pins another Ray than the manifests' rayVersion"
    (ray_req,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray"]
    assert ray_req.specifier.contains(version), f"rayVersion {version} is outside pyproject.toml's {ray_req}"


def test_metrics_are_exported_on_the_port_that_prometheus_scrapes():
    prom = yaml.safe_load((INFRA / "prometheus/prometheus.yml").read_text())
    static = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    ports = {int(t.rsplit(":", 1)[1]) for t in static}
    ports |= {
        int(g["rayStartParams"]["metrics-export-port"])
        for spec in _cluster_specs().values()
        for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    }
    ports |= {p["containerPort"] for c in _containers() for p in c["ports"] if p["name"] == "metrics"}
    up = yaml.safe_load((INFRA / "ray-up/aws-gpu.yaml").read_text())
    for cmd in up["head_start_ray_commands"] + up["worker_start_ray_commands"]:
        if "ray start" in cmd:
            ports.add(int(re.search(r"--metrics-export-port=(\d+)", cmd).group(1)))
    assert len(ports) == 1, f"metrics ports disagree: {ports}"
    (monitor,) = _docs(INFRA / "prometheus/podmonitor.yaml")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert all(endpoint["port"] in {p["name"] for p in c["ports"]} for c in _containers())


# --- jobs and serving ------------------------------------------------------------------------------------


def test_rayjobs_submit_to_the_raycluster():
    name = _one("RayCluster")["metadata"]["name"]
    for job in _kind("RayJob"):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}


def test_the_training_job_runs_the_train_cli_pretrain_then_finetune_on_the_gpus():
    (pretrain, finetune) = _entrypoint("sdm-train")
    assert pretrain[0] == finetune[0] == "jobs.train"
    pre, ft = pretrain[1], finetune[1]
    assert (pre.stage, ft.stage) == ("pretrain", "finetune")
    assert ft.init_from == pre.run and ft.data == pre.data
    gpu = _gpu_group(_one("RayCluster")["spec"])
    pod_cpus = float(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    for a in (pre, ft):
        assert a.use_gpu and a.num_workers <= gpu["maxReplicas"] and a.cpus_per_worker < pod_cpus


def test_the_generation_job_reads_the_trained_model_and_fits_the_gpu_group():
    ((module, a),) = _entrypoint("sdm-generate")
    train = {x.stage: x for _, x in _entrypoint("sdm-train")}
    assert module == "jobs.generate"
    assert a.model == train["finetune"].run and a.labels == train["finetune"].data
    assert a.num_gpus_per_worker == 1
    most = a.concurrency[1] if isinstance(a.concurrency, tuple) else a.concurrency
    assert most <= _gpu_group(_one("RayCluster")["spec"])["maxReplicas"]


@pytest.mark.parametrize("name", ["serve/config.yaml", "rayservice.yaml"])
def test_serve_configs_are_valid_serve_deploy_configs_with_valid_app_args(name):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs

    config = _serve_configs()[name]
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), app["import_path"]
        assert callable(getattr(importlib.import_module(module), attr))
        AppArgs.model_validate(app["args"])


def test_the_rayservice_serves_the_trained_model_on_gpus_within_the_gpu_group():
    (app,) = _serve_configs()["rayservice.yaml"]["applications"]
    train = {x.stage: x for _, x in _entrypoint("sdm-train")}
    assert app["args"]["model_uri"] == train["finetune"].run
    assert app["args"]["num_gpus"] == 1
    assert app["args"]["max_replicas"] <= _gpu_group(_one("RayService")["spec"]["rayClusterConfig"])["maxReplicas"]


# --- ray up ----------------------------------------------------------------------------------------------


def test_the_ray_up_config_passes_rays_schema_with_a_cpu_head_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray-up/aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "aws"
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert [t["resources"]["GPU"] for t in workers] == [1]
    assert any("ray start --head" in c and "--num-cpus=0" in c for c in config["head_start_ray_commands"])


# --- the image -------------------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (INFRA / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _pip_install_targets(command: str) -> list[str]:
    """The positional targets of every `pip install` in a shell command line."""
    targets = []
    for part in re.split(r"&&|;", command):
        argv = shlex.split(part)
        for i in range(len(argv) - 1):
            if argv[i] in ("pip", "pip3") and argv[i + 1] == "install":
                targets += [a for a in argv[i + 2 :] if not a.startswith("-")]
    return targets


def _source_and_extras(target: str) -> tuple[str, set[str]]:
    m = re.fullmatch(r"([^\[]+)(?:\[([^\]]*)\])?", target)
    return m.group(1), set(filter(None, (m.group(2) or "").split(",")))


def test_the_image_installs_the_package_from_pyproject_like_the_makefile_without_test_extras():
    steps = _dockerfile()
    assert steps[0][0] == "FROM" and steps[0][1].startswith("nvidia/cuda:"), "the image should start from a CUDA base"
    workdir, copied, installs = None, {}, []
    for op, arg in steps:
        if op == "WORKDIR":
            workdir = arg
        elif op == "COPY":
            *srcs, dst = arg.split()
            for s in srcs:
                copied[s] = dst
        elif op == "RUN":
            installs += [(workdir, t) for t in _pip_install_targets(arg) if not t.startswith(("ray[", "pip"))]
    assert len(installs) == 1, f"expected one install of the package, got {installs}"
    (image_dir, image_target), = installs
    image_source, image_extras = _source_and_extras(image_target)
    assert image_source == "." and copied.get("pyproject.toml") == "./" and image_dir == "/app"

    make = (ROOT / "Makefile").read_text()
    lines = [line for line in make.splitlines() if "pip install" in line]
    (make_target,) = [t for line in lines for t in _pip_install_targets(line) if t != "pip"]
    make_source, make_extras = _source_and_extras(make_target)
    assert make_source == image_source == "." and (ROOT / "pyproject.toml").exists()
    assert "test" in make_extras and "test" not in image_extras
    # Every package that pyproject.toml installs is copied in, or `pip install` would silently miss it.
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= {s.rstrip("/") for s in copied}, f"packages not copied into the image: {packages - set(copied)}"


def test_the_image_bakes_in_no_weights_or_data():
    steps = _dockerfile()
    for op, arg in steps:
        if op in ("COPY", "ADD"):
            assert not re.search(r"runs|artifacts|\.safetensors|\.pt\b|\.ckpt|https?://", arg), f"{op} {arg}"
        if op == "RUN":
            assert not re.search(r"\b(wget|curl)\b.*https?://", arg), f"the image downloads something: {arg}"
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore should exclude everything but the package source"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {s.rstrip("/") for op, arg in steps if op == "COPY" for s in arg.split()[:-1]}
    assert allowed == copied
    for pattern in ("**/*.safetensors", "**/*.pt", "**/*.ckpt"):
        assert pattern in ignore


# --- docs ------------------------------------------------------------------------------------------------


def test_the_commands_in_the_deployment_guide_parse_with_the_clis():
    text = re.sub(r"\\\n\s*", " ", (ROOT / "docs/deployment.md").read_text())
    commands = [line.split("-- ", 1)[-1].split("#")[0] for line in text.splitlines() if "python -m " in line and "`" not in line]
    assert len(commands) >= 4
    for cmd in commands:
        _parse_cli(*_module_args(shlex.split(cmd[cmd.index("python -m"):])))


def test_the_deployment_guide_names_every_infra_file_and_only_files_that_exist():
    text = (ROOT / "docs/deployment.md").read_text() + (ROOT / "docs/serving.md").read_text()
    named = set(re.findall(r"\b(?:infra|serve|jobs|docs)/[\w./-]*\w", text))
    missing = {p for p in named if not (ROOT / p).exists()}
    assert not missing, f"the docs name files that do not exist: {missing}"
    infra_files = {p.relative_to(ROOT).as_posix() for p in INFRA.rglob("*") if p.is_file()}
    guide = (ROOT / "docs/deployment.md").read_text()
    assert not {p for p in infra_files if p not in guide}, "docs/deployment.md should name every file in infra/"
