"""infra/ does not rot: every manifest and config parses, and what it names (modules, arguments, serve args,
secrets, ports, images, package source) exists in this repository and agrees with the CLIs and with each other."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import itertools
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


DASHBOARD = INFRA / "grafana/sdm-serve-dashboard.json"
# Ray names a metric "ray_" + its name, and a counter's samples end in _total, a histogram's in _bucket/_sum/_count.
SAMPLE_SUFFIXES = {"Counter": ["_total"], "Histogram": ["_bucket", "_sum", "_count"], "Gauge": [""]}
# The Ray Serve sources whose metrics the dashboard may query (Serve's model multiplexing).
RAY_SERVE_METRIC_SOURCES = ["serve/multiplex.py"]
# Panels an operator needs to see each model apart and which replica holds which.
PER_MODEL_PANELS = {
    "Models loaded per replica",
    "Model loads and evictions per minute by model",
    "Model load time by model",
    "Images per second by model",
    "Request latency p99 by model",
    "Queue wait p99 by model",
}


def _declared_metrics(path: Path) -> dict[str, tuple[str, set[str]]]:
    """{exported name: (kind, tag keys)} of every Counter/Gauge/Histogram a module declares with a literal name,
    exported names as Prometheus sees them (ray_ prefix, sample suffixes). Tag keys given by a local tuple are
    resolved (`model = ("model",)` ... `tag_keys=model`)."""
    tree = ast.parse(path.read_text())
    tuples = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, tuple):
                tuples[node.targets[0].id] = value
    declared = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        kind = getattr(node.func, "attr", getattr(node.func, "id", None))
        if kind not in SAMPLE_SUFFIXES or not node.args or not isinstance(node.args[0], ast.Constant):
            continue
        tags: set[str] = set()
        for kw in node.keywords:
            if kw.arg == "tag_keys":
                tags = set(tuples[kw.value.id] if isinstance(kw.value, ast.Name) else ast.literal_eval(kw.value))
        for suffix in SAMPLE_SUFFIXES[kind]:
            declared[f"ray_{node.args[0].value}{suffix}"] = (kind, tags)
    return declared


def _app_metrics() -> dict[str, tuple[str, set[str]]]:
    return _declared_metrics(ROOT / "serve/metrics.py")


def _ray_serve_metrics() -> dict[str, tuple[str, set[str]]]:
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent
    return {k: v for source in RAY_SERVE_METRIC_SOURCES for k, v in _declared_metrics(ray_dir / source).items()}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    return [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable (label_values(SELECTOR, label) -> SELECTOR)."""
    queries = [(f"panel {p['id']} {t['refId']}", t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
            assert m, f"variable {var['name']}: expected label_values(SELECTOR, label), got {var['query']}"
            queries.append((f"variable {var['name']}", m.group(1)))
    return queries


def _selectors(expr: str) -> list[tuple[str, str]]:
    """(metric, label matchers) of every ray_* metric an expression names ("" where it has no {...})."""
    return [(m.group(1), m.group(2) or "") for m in re.finditer(r"\b(ray_\w+)(?:\{([^}]*)\})?", expr)]


def test_the_grafana_dashboard_is_json_and_queries_only_metrics_the_app_exports():
    queries = _queries(_dashboard())
    assert queries
    used = {name for _, e in queries for name, _ in _selectors(e)}
    app, serve = _app_metrics(), _ray_serve_metrics()
    assert "ray_sdm_model_loaded" in app and "ray_serve_num_multiplexed_models" in serve, "declarations not found"
    used_app = {n for n in used if n.startswith("ray_sdm_")}
    assert used_app, "the dashboard queries none of the app's metrics"
    assert used_app <= set(app), f"the dashboard queries metrics the app does not export: {used_app - set(app)}"
    used_serve = {n for n in used if n.startswith("ray_serve_")}
    assert used_serve <= set(serve), (
        f"the dashboard queries Ray Serve metrics that ray's {RAY_SERVE_METRIC_SOURCES} does not declare: "
        f"{used_serve - set(serve)}"
    )
    assert used == used_app | used_serve, f"the dashboard queries other ray_* metrics: {used - used_app - used_serve}"


def test_the_grafana_dashboard_has_a_model_variable_next_to_the_application_variable():
    variables = _dashboard()["templating"]["list"]
    names = [v["name"] for v in variables]
    assert "application" in names and "model" in names, f"dashboard variables: {names}"
    assert names.index("model") == names.index("application") + 1
    model = variables[names.index("model")]
    assert model["type"] == "query" and model["multi"] is True and model["includeAll"] is True
    assert re.fullmatch(r"label_values\(ray_sdm_model_loaded(\{[^}]*\})?,\s*model\)", model["query"]), model["query"]
    # "All" as .* rather than the list of loaded models: it keeps requests naming no model (model="") and models
    # that were asked for but never loaded.
    assert model.get("allValue") == ".*"


def test_the_grafana_dashboard_panels_have_unique_ids_and_do_not_overlap():
    dashboard = _dashboard()
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
    boxes = []
    for p in dashboard["panels"]:  # a collapsed row's panels are laid out only when it opens
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0, f"panel {p['id']}: {g}"
        assert g["x"] + g["w"] <= 24, f"panel {p['id']} is wider than the dashboard's 24 columns: {g}"
        boxes.append((p["id"], g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"]))
    for (a, ax0, ay0, ax1, ay1), (b, bx0, by0, bx1, by1) in itertools.combinations(boxes, 2):
        assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, f"panels {a} and {b} overlap"


def test_every_model_side_panel_filters_by_the_model_variable():
    dashboard = _dashboard()
    tagged = {name: tags for name, (_, tags) in (_app_metrics() | _ray_serve_metrics()).items()}
    model_side = {
        p["title"]
        for p in _panels(dashboard)
        for t in p.get("targets", [])
        if any("model" in tagged.get(name, ()) for name, _ in _selectors(t["expr"]))
    }
    assert PER_MODEL_PANELS <= model_side, f"missing per-model panels: {PER_MODEL_PANELS - model_side}"
    for where, expr in _queries(dashboard):
        if not where.startswith("panel"):
            continue
        for name, matchers in _selectors(expr):
            assert 'application=~"$application"' in matchers, f"{where}: {name} is not filtered by $application"
            if "model" in tagged.get(name, ()):
                assert 'model=~"$model"' in matchers, f"{where}: {name} is not filtered by model=~\"$model\""
            if "model_id" in tagged.get(name, ()):
                assert 'model_id=~"$model"' in matchers, f"{where}: {name} is not filtered by model_id=~\"$model\""
    (table,) = [p for p in _panels(dashboard) if p["title"] == "Models loaded per replica"]
    (query,) = table["targets"]
    assert table["type"] == "table" and query.get("instant") and query.get("format") == "table"
    assert re.search(r"by \(replica, model\)", query["expr"]) and "ray_sdm_model_loaded" in query["expr"]


def _as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: its interval variables as 5m, every other variable as .*."""
    expr = re.sub(r"\$\{?__\w+\}?", "5m", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def test_promtool_parses_every_dashboard_expression(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed; `make system-deps` installs it")
    rules = [
        {"record": f"dashboard:query_{i}:" + re.sub(r"\W+", "_", where), "expr": _as_promql(expr)}
        for i, (where, expr) in enumerate(_queries(_dashboard()))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "sdm-serve-dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout


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
