"""What a config asks a Ray cluster for, and whether a cluster's node types can give it.

The same resolution the actors use (`runtime.gpus_for`), so a config checked here is
placed the same way at run time. Used by the test of the shipped configs against
cluster.yaml's node types, and usable before `ray up`."""

from __future__ import annotations

from hh_ray.config import Config, parse_resources
from hh_ray.runtime import gpus_for


def demands(cfg: Config, cluster_gpus: float) -> list[tuple[str, int, dict[str, float]]]:
    """(what, how many, resources of one) for every actor and learner worker of a PPO run and
    of PM training, on a cluster with `cluster_gpus` GPUs."""
    g, p = cfg.generation, cfg.ppo

    def need(cpus, gpus, custom, where):
        return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}), **parse_resources(custom, where)}

    return [
        ("generation worker", g.num_workers,
         need(g.cpus_per_worker, gpus_for(g.num_gpus, cluster_gpus, g.tensor_parallel_size), g.resources,
              "generation.resources")),
        ("PM service", 1, need(p.pm_service_cpus, gpus_for(p.pm_service_gpus, cluster_gpus, 1), p.pm_service_resources,
                               "ppo.pm_service_resources")),
        ("PPO learner", p.num_learners, need(p.cpus_per_learner, gpus_for(p.gpus_per_learner, cluster_gpus, 1),
                                             p.learner_resources, "ppo.learner_resources")),
        ("PM learner", cfg.pm.num_workers,
         need(0 if cluster_gpus >= cfg.pm.num_workers else cfg.pm.cpus_per_worker,
              1 if cluster_gpus >= cfg.pm.num_workers else 0, "", "pm")),
    ]


def check_placement(cfg: Config, node_types: dict[str, dict]) -> list[str]:
    """Problems placing a PPO run (and, separately, PM training) on a cluster whose node types
    are {name: {"resources": {...}, "max_workers": n}}; [] when it fits. Each actor must fit on
    one node of some type, and all of a stage's actors together on at most `max_workers` nodes
    of each type (first fit, largest first)."""
    cluster_gpus = sum(t["resources"].get("GPU", 0) * t.get("max_workers", 1) for t in node_types.values())
    problems = []
    wanted = demands(cfg, cluster_gpus)
    stages = {"PPO": [d for d in wanted if d[0] != "PM learner"], "PM training": [d for d in wanted if d[0] == "PM learner"]}
    for stage, items in stages.items():
        nodes = [dict(t["resources"]) for t in node_types.values() for _ in range(t.get("max_workers", 1))]
        for what, count, need in sorted(items, key=lambda d: -sum(d[2].values())):
            if not any(all(node_type["resources"].get(k, 0) >= v for k, v in need.items())
                       for node_type in node_types.values()):
                offered = ", ".join(f"{n}: {t['resources']}" for n, t in node_types.items())
                problems.append(f"{what}: needs {need}, which no node type offers ({offered})")
                continue
            for i in range(count):
                node = next((n for n in nodes if all(n.get(k, 0) >= v for k, v in need.items())), None)
                if node is None:
                    problems.append(f"{stage}: {what} {i + 1} of {count} (needs {need}) does not fit on the nodes "
                                    "left at max_workers")
                    break
                for k, v in need.items():
                    node[k] -= v
    return problems
