"""python -m cluster gcloud|render|doctor|up|status|down --config CLUSTER.yaml

gcloud  print the gcloud/helm/kubectl commands that prepare the project for this config (APIs,
        GKE cluster, node pools, bucket, service accounts, Workload Identity, images, KubeRay,
        namespace); with --teardown, the commands that remove all of it; nothing is contacted.
render  print the objects as YAML (for kubectl apply -f -); nothing is contacted.
doctor  check the live cluster and project before anything is created: the KubeRay operator,
        its version and feature gates, the CRDs, Pod Security labels, service accounts; with
        Google credentials also node pools, bucket IAM, Workload Identity and the images. One
        line per failed assumption.
up      run doctor's checks, then create or update the objects through the API, wait for the
        RayCluster to be ready and print
        the dashboard address for `ray job submit` (with --job: run ENTRYPOINT as a one-shot
        RayJob and wait for it to finish).
status  the cluster's state, and per worker group how many pods are ready of how many wanted,
        which resource is short and why (pod conditions and events).
down    delete the RayCluster (or the RayJob), any Triton we launched, the PodMonitorings, the
        Role, RoleBinding and service accounts; the namespace stays.

Credentials: --kubeconfig, else in-cluster, else ~/.kube/config (gcloud container clusters
get-credentials writes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

import yaml

from cluster import diagnose, doctor, gcloud, monitoring, pods, raycluster, rbac, triton
from cluster.config import ClusterConfig, load_config
from cluster.kubeapi import Kube, new_api_client
from cluster.wait import wait_for
from core.cli import emit_summary, run_main
from core.errors import UserError

# By name, not __name__: ``python -m cluster`` runs this module as __main__, a logger
# that the entry point's configuration (core.cli.configure_logging) would not show at INFO.
LOG = logging.getLogger("cluster")


def _progress(message: str) -> None:
    # Progress goes to stderr (run_main's logging) so that with --json the last stdout line
    # stays the summary.
    LOG.info("%s", message)


def render_objects(cfg: ClusterConfig, job: str | None = None,
                   runtime_env: dict | None = None, deadline: int | None = None) -> list[dict]:
    """Every object `up` applies, in order."""
    top = (raycluster.rayjob(cfg, job, runtime_env, deadline=deadline) if job is not None
           else raycluster.raycluster(cfg))
    return rbac.access_objects(cfg) + [top] + monitoring.monitoring_objects(cfg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster",
        description="KubeRay on GKE: prepare the project for, render, create, inspect and "
                    "delete our Ray cluster.",
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, api: bool = True) -> None:
        p.add_argument("--config", required=True,
                       help="cluster YAML, a local path or gs:// URL (examples/cluster-*.yaml)")
        p.add_argument("--json", action="store_true",
                       help="print a JSON summary as the last stdout line")
        if api:
            p.add_argument("--kubeconfig", default=None,
                           help="kubeconfig file; default in-cluster, else ~/.kube/config")
            p.add_argument("--context", default=None, help="kubeconfig context")
            p.add_argument("--retries", type=int, default=5,
                           help="retries on 429/5xx/connection errors (default 5)")
            p.add_argument("--retry-backoff", type=float, default=0.5,
                           help="first wait between retries in seconds, doubled each time "
                           "(default 0.5)")

    def job_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--job", default=None, metavar="ENTRYPOINT",
                       help="a one-shot RayJob running ENTRYPOINT on its own cluster, deleted "
                       "when the job ends, instead of a long-lived RayCluster")
        p.add_argument("--runtime-env-json", default=None,
                       help="the RayJob's runtime env, e.g. env_vars (the code comes from the "
                       "image: a RayJob uploads nothing from here)")
        p.add_argument("--job-deadline", type=int, default=None, metavar="SECONDS",
                       help="with --job: the RayJob's activeDeadlineSeconds (KubeRay fails the "
                       "job and deletes its cluster after it); default none")

    p = sub.add_parser("gcloud", help="print the commands that prepare the project")
    common(p, api=False)
    p.add_argument("--teardown", action="store_true",
                   help="print the commands that remove what the setup made instead (the "
                   "cluster, the images and their repository, Cloud Build's staging bucket, the "
                   "service accounts); the data bucket's removal stays commented out")

    p = sub.add_parser("doctor", help="check the live cluster and project; one line per "
                                      "failed assumption")
    common(p)

    p = sub.add_parser("render", help="print the objects as YAML")
    common(p, api=False)
    job_flags(p)
    p.add_argument("--output", default=None, help="write the YAML here instead of stdout")

    p = sub.add_parser("up", help="create/update, wait until ready, print the dashboard address")
    common(p)
    job_flags(p)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait: for the cluster, default 900; with --job, default no "
                   "limit: wait until the RayJob ends (bounded by --job-deadline if given); "
                   "0: check once, do not wait")
    p.add_argument("--poll", type=float, default=5, help="seconds between checks (default 5)")
    p.add_argument("--no-doctor", action="store_true",
                   help="skip the preflight checks of `doctor` (not recommended)")

    p = sub.add_parser("status", help="state per group: ready/wanted, short resources, why")
    common(p)
    p.add_argument("--job", action="store_true", help="report on the RayJob instead")

    p = sub.add_parser("down", help="delete the cluster, launched Tritons and the access objects")
    common(p)
    p.add_argument("--job", action="store_true", help="delete the RayJob instead")
    p.add_argument("--keep-access", action="store_true",
                   help="keep the service accounts, Role and RoleBinding")
    return parser


def _runtime_env(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        env = json.loads(text)
    except ValueError as exc:
        raise UserError(f"--runtime-env-json is not JSON: {exc}") from exc
    if not isinstance(env, dict):
        raise UserError("--runtime-env-json must be a JSON object")
    return env


# -- commands --------------------------------------------------------------------------------

def cmd_render(cfg: ClusterConfig, args: argparse.Namespace) -> dict:
    """`render`: the objects as YAML on stdout or --output; nothing is contacted."""
    objects = render_objects(cfg, args.job, _runtime_env(args.runtime_env_json),
                             args.job_deadline)
    text = yaml.safe_dump_all(objects, sort_keys=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    elif not args.json:
        sys.stdout.write(text)
    return {"objects": [f"{o['kind']}/{o['metadata']['name']}" for o in objects],
            "output": args.output or "-"}


def cmd_gcloud(cfg: ClusterConfig, args: argparse.Namespace) -> dict:
    """`gcloud`: the project's setup commands for this config, as a shell script on stdout."""
    # A ConfigError raised here is a UserError already: one line, exit 2 (core.cli.run_main).
    steps = (gcloud.teardown_steps if args.teardown else gcloud.steps)(cfg, args.config)
    text = gcloud.script(cfg, args.config, teardown=args.teardown)
    if not args.json:
        sys.stdout.write(text)
    return {"commands": sum(len(commands) for _, commands in steps),
            "namespace": cfg.namespace}


def _cluster_report(kube: Kube, cfg: ClusterConfig, rc: dict) -> tuple[list, str]:
    name = rc["metadata"]["name"]
    pod_list = kube.list("Pod", cfg.namespace, label_selector=f"ray.io/cluster={name}")
    events = kube.list("Event", cfg.namespace)
    groups = diagnose.diagnose(rc, pod_list, events)
    headline = diagnose.summary(rc, groups)
    refusal = diagnose.operator_refusal(events, "RayCluster", name)
    if refusal:
        # No pod will come: say why first (the operator's InvalidRayClusterSpec event).
        headline += f"; the KubeRay operator refused the spec: {refusal}"
    return groups, headline


def dashboard_address(kube: Kube, cfg: ClusterConfig) -> str:
    """The address for `ray job submit`: the LoadBalancer's IP if there is one, else the
    in-cluster Service name (reach it with kubectl port-forward)."""
    if cfg.head.service_type == "LoadBalancer":
        svc = kube.get("Service", cfg.head_service, cfg.namespace) or {}
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        if ingress:
            return raycluster.dashboard_url(cfg, ingress[0].get("ip") or ingress[0].get(
                "hostname"))
    return raycluster.dashboard_url(cfg)


def _doctor(cfg: ClusterConfig, kube: Kube) -> doctor.Report:
    google = doctor.GoogleApis.from_environment()
    report = doctor.run(cfg, kube, google)
    if report.skipped:
        _progress(f"doctor: no Google credentials (gcloud auth application-default login): "
                  f"skipped {', '.join(report.skipped)}")
    return report


def cmd_doctor(cfg: ClusterConfig, args: argparse.Namespace, kube: Kube) -> dict:
    """`doctor`: every check; the failed assumptions on stdout, one a line; fails if any."""
    report = _doctor(cfg, kube)
    if not args.json:
        for line in report.lines():
            print(line)
    if not report.ok:
        raise UserError(f"doctor: {len(report.lines())} assumption(s) do not hold: "
                        f"{report.lines()[0]}")
    _progress(f"doctor: all {len(report.failures)} checks hold")
    return report.to_json()


def cmd_up(cfg: ClusterConfig, args: argparse.Namespace, kube: Kube) -> dict:
    """`up`: doctor's checks, apply every object, then wait for the RayCluster (or run the
    RayJob to its end); stops at once when the operator refuses the spec."""
    objects = render_objects(cfg, args.job, _runtime_env(args.runtime_env_json),
                             args.job_deadline)
    if not args.no_doctor:
        report = _doctor(cfg, kube)
        for line in report.lines():
            _progress(line)
        blocking = report.lines(skip=doctor.REPAIRED_BY_UP)
        if blocking:
            raise UserError(f"up: nothing created, {len(blocking)} assumption(s) do not "
                            f"hold (python -m cluster doctor): {blocking[0]}")
    # Events already there are old news: only a refusal after our apply stops `up`.
    seen = diagnose.event_keys(kube.list("Event", cfg.namespace)) \
        if kube.get("Namespace", cfg.namespace) is not None else set()
    applied = []
    for obj in objects:
        outcome, _ = kube.apply(obj)
        _progress(f"{obj['kind']}/{obj['metadata']['name']}: {outcome}")
        applied.append(f"{obj['kind']}/{obj['metadata']['name']}: {outcome}")
    if args.job is not None:
        return {"applied": applied, **_wait_job(cfg, args, kube)}

    state: dict = {}

    def check() -> bool:
        state["rc"] = kube.get("RayCluster", cfg.name, cfg.namespace) or {}
        if diagnose.raycluster_ready(state["rc"]):
            return True
        refusal = diagnose.operator_refusal(kube.list("Event", cfg.namespace), "RayCluster",
                                            cfg.name, seen)
        if refusal:
            # The operator creates no pod for a refused spec: waiting would only time out.
            raise UserError(f"RayCluster {cfg.name}: the KubeRay operator refused it, "
                            f"{refusal}")
        return False

    def describe() -> str:
        groups, headline = _cluster_report(kube, cfg, state["rc"])
        short = [g.line() for g in groups if not g.ok]
        return headline + ("; " + "; ".join(short) if short else "")

    # `is None`: --timeout 0 is a real value (one check, no wait), not "the default".
    timeout = 900 if args.timeout is None else args.timeout
    wait_for(check, describe, timeout, args.poll)
    url = dashboard_address(kube, cfg)
    if cfg.head.service_type != "LoadBalancer":
        _progress(f"from outside the cluster: kubectl -n {cfg.namespace} port-forward "
                  f"svc/{cfg.head_service} 8265:8265, then --address http://127.0.0.1:8265")
    # authOptions.mode token (cluster/raycluster.py): job submission needs the cluster's token,
    # which the operator keeps in a Secret named after the RayCluster (raycluster.auth_secret).
    _progress("the cluster requires Ray token authentication (docs/gke.md, section 5):")
    _progress(raycluster.token_command(cfg.namespace, cfg.name))
    _progress(f"ray job submit --address {url} -- python -m ray_jobs.pipeline "
              f"--config PIPELINE.yaml --json")
    return {"applied": applied, "ready": True, "dashboard": url,
            "namespace": cfg.namespace, "raycluster": cfg.name}


# RayJob deployment states that end it (ray-operator/apis/ray/v1/rayjob_types.go, v1.7.0).
JOB_DEPLOYMENT_ENDS = ("Complete", "Failed", "ValidationFailed")


def _wait_job(cfg: ClusterConfig, args: argparse.Namespace, kube: Kube) -> dict:
    name = raycluster.rayjob_name(cfg)
    state: dict = {}

    def check() -> bool:
        job = kube.get("RayJob", name, cfg.namespace) or {}
        state["status"] = job.get("status") or {}
        # ValidationFailed is final too: the controller never leaves it (rayjob_controller.go,
        # v1.7.0), though KubeRay's IsJobDeploymentTerminal omits it.
        return state["status"].get("jobDeploymentStatus") in JOB_DEPLOYMENT_ENDS or \
            state["status"].get("jobStatus") in ("SUCCEEDED", "FAILED", "STOPPED")

    started = time.monotonic()

    def describe() -> str:
        # The elapsed minutes make the line change once a minute: a heartbeat while it runs.
        s = state.get("status") or {}
        return (f"[{int(time.monotonic() - started) // 60} min] RayJob {name}: deployment "
                f"{s.get('jobDeploymentStatus', 'pending')}, job {s.get('jobStatus', 'pending')}")

    # No timeout of ours by default: the job ends by itself, or KubeRay ends it at its
    # activeDeadlineSeconds (--job-deadline); a timeout here would only abandon a running job.
    timeout = math.inf if args.timeout is None else args.timeout
    wait_for(check, describe, timeout, args.poll, what=f"RayJob {name}")
    status = state["status"]
    if status.get("jobStatus") != "SUCCEEDED":
        reason = f", {status['reason']}" if status.get("reason") else ""
        raise UserError(f"RayJob {name} ended {status.get('jobStatus') or 'without a job'} "
                        f"({status.get('jobDeploymentStatus')}{reason}): "
                        f"{' '.join((status.get('message') or 'no message').split())}")
    return {"rayjob": name, "job_status": status.get("jobStatus"),
            "job_id": status.get("jobId"), "namespace": cfg.namespace}


def cmd_status(cfg: ClusterConfig, args: argparse.Namespace, kube: Kube) -> dict:
    """`status`: the RayCluster's (or RayJob's) state and, per group, ready/wanted and why."""
    result: dict = {"namespace": cfg.namespace}
    name = cfg.name
    if args.job:
        job = kube.get("RayJob", raycluster.rayjob_name(cfg), cfg.namespace)
        if job is None:
            raise UserError(f"RayJob {raycluster.rayjob_name(cfg)} not found in namespace "
                            f"{cfg.namespace!r}")
        status = job.get("status") or {}
        result.update(rayjob=job["metadata"]["name"], job_status=status.get("jobStatus"),
                      job_deployment_status=status.get("jobDeploymentStatus"))
        print(f"RayJob {job['metadata']['name']}: deployment "
              f"{status.get('jobDeploymentStatus')}, job {status.get('jobStatus')}", flush=True)
        name = status.get("rayClusterName")
        if not name:
            return result
    rc = kube.get("RayCluster", name, cfg.namespace)
    if rc is None:
        raise UserError(f"RayCluster {name} not found in namespace {cfg.namespace!r}; "
                        f"create it with python -m cluster up --config {args.config}")
    groups, headline = _cluster_report(kube, cfg, rc)
    ready = diagnose.raycluster_ready(rc)
    if not args.json:
        print(headline)
        for g in groups:
            print(f"  {g.line()}")
        if ready:
            print(f"dashboard: {dashboard_address(kube, cfg)}")
    result.update(raycluster=name, ready=ready, state=(rc.get("status") or {}).get("state"),
                  groups=[g.to_json() for g in groups])
    if ready:
        result["dashboard"] = dashboard_address(kube, cfg)
    return result


def cmd_down(cfg: ClusterConfig, args: argparse.Namespace, kube: Kube) -> dict:
    """`down`: delete the cluster (or job), leftover Tritons and, unless --keep-access, the
    service accounts, Role and RoleBinding; the namespace stays (it may hold other things)."""
    deleted = []
    if args.job:
        targets = [("RayJob", raycluster.rayjob_name(cfg))]
    else:
        targets = [("RayCluster", cfg.name)]
    # Tritons a serve job left behind keep GPUs busy; they go with the cluster.
    for kind in ("Deployment", "Service"):
        for obj in kube.list(kind, cfg.namespace,
                             label_selector=pods.selector(triton.SELECTOR)):
            targets.append((kind, obj["metadata"]["name"]))
    targets += [(o["kind"], o["metadata"]["name"]) for o in monitoring.monitoring_objects(cfg)]
    if not args.keep_access:
        targets += [("RoleBinding", rbac.role_name(cfg)), ("Role", rbac.role_name(cfg)),
                    ("ServiceAccount", cfg.service_accounts.triton),
                    ("ServiceAccount", cfg.service_accounts.ray)]
    for kind, name in targets:
        gone = kube.delete(kind, name, cfg.namespace)
        _progress(f"{kind}/{name}: {'deleted' if gone else 'not found'}")
        if gone:
            deleted.append(f"{kind}/{name}")
    return {"deleted": deleted, "namespace": cfg.namespace}


def main(argv: list[str] | None = None) -> int:
    """Parse ARGV, run the command, print the summary; returns 0 (errors raise UserError)."""
    args = _parser().parse_args(argv)
    cfg = load_config(args.config)  # a ConfigError is a UserError: one line, exit 2
    if args.command in ("render", "gcloud"):
        summary = (cmd_render if args.command == "render" else cmd_gcloud)(cfg, args)
    else:
        kube = Kube(new_api_client(args.kubeconfig, args.context), retries=args.retries,
                    backoff=args.retry_backoff)
        command = {"up": cmd_up, "status": cmd_status, "down": cmd_down,
                   "doctor": cmd_doctor}[args.command]
        summary = command(cfg, args, kube)
    if args.json or args.command in ("up", "down"):
        emit_summary(summary, args.json)
    return 0


if __name__ == "__main__":
    run_main(main)
