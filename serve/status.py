"""`python -m serve.status`: what `serve status` says of each application, plus which models every model replica
holds and what it has drawn with each.

The holdings are the replicas' own metrics (sdm_model_loaded, sdm_images_generated), read from every node's Ray
metrics endpoint: the numbers the Grafana dashboard shows, at most one metrics report interval old.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass

import requests
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Holding:
    application: str
    replica: str
    model: str
    images: int  # images this replica drew with the model since it started


def metrics_urls() -> list[str]:
    """The Prometheus endpoint of every alive node of the connected Ray cluster."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n["Alive"] and n.get("MetricsExportPort")
    ]


def holdings(urls: list[str]) -> list[Holding]:
    """The models each replica holds now (ray_sdm_model_loaded == 1), sorted by application, replica, model."""
    held: set[tuple[str, str, str]] = set()
    images: dict[tuple[str, str, str], float] = defaultdict(float)
    for url in urls:
        try:
            text = requests.get(url, timeout=10).text
        except requests.RequestException:  # a node going away; the others still answer
            continue
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.labels.get("application", ""), sample.labels.get("replica", ""), sample.labels.get("model", ""))
                if sample.name == "ray_sdm_model_loaded" and sample.value == 1:
                    held.add(key)
                elif sample.name == "ray_sdm_images_generated_total":
                    images[key] += sample.value
    return [Holding(*key, int(images[key])) for key in sorted(held)]


def report(app_filter: str | None = None) -> str:
    """Each application's status and deployments (as `serve status`), with the models its replicas hold."""
    from ray import serve

    by_app: dict[str, list[Holding]] = defaultdict(list)
    for h in holdings(metrics_urls()):
        by_app[h.application].append(h)
    lines = []
    for name, app in serve.status().applications.items():
        if app_filter and name != app_filter:
            continue
        lines.append(f"application {name}: {app.status.value}" + (f" ({app.message})" if app.message else ""))
        for dep_name, dep in app.deployments.items():
            replicas = ", ".join(f"{n} {getattr(state, 'value', state)}" for state, n in dep.replica_states.items())
            replicas = replicas or "no replicas"
            lines.append(
                f"  deployment {dep_name}: {dep.status.value}, {replicas}" + (f" ({dep.message})" if dep.message else "")
            )
        held = by_app.get(name, [])
        if held:
            lines.append("  models loaded (replica: model, images drawn):")
            per_replica: dict[str, list[Holding]] = defaultdict(list)
            for h in held:
                per_replica[h.replica].append(h)
            for replica, hs in per_replica.items():
                lines.append(f"    {replica}: " + ", ".join(f"{h.model} ({h.images})" for h in hs))
    return "\n".join(lines) if lines else "no Serve applications"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.status", description=__doc__.splitlines()[0])
    p.add_argument("--address", default="auto", help="the Ray cluster (default: the running one, as `serve status`)")
    p.add_argument("--app", help="only this application")
    a = p.parse_args(argv)
    import logging

    import ray

    ray.init(address=a.address, logging_level=logging.ERROR, log_to_driver=False)
    print(report(a.app))
    return 0


if __name__ == "__main__":
    sys.exit(main())
