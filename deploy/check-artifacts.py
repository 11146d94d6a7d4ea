#!/usr/bin/env python3
"""Checks the deployment artifacts under deploy/; run through deploy/check-artifacts.sh.

The shell script installs the linters (cached under ~/.cache/roster) and passes their paths;
this file runs every check and prints one line each: `ok`, `FAIL`, `warn` (worth a look,
not a failure) or `skip` (an optional tool is missing: hadolint, whose absence leaves the
structural Dockerfile check, shellcheck, kubectl). A missing required tool (promtool,
yamllint, check-jsonschema, kubernetes-validate, systemd-analyze) is a failure. Exit status
1 when any check failed.

What cannot be checked here, and is not claimed: no image is built or pulled (no Docker
engine), no Compose stack or Kubernetes cluster runs, no Grafana renders the dashboard, and
no systemd runs the unit. The checks are schemas, linters, promtool and cross-file wiring.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

DASHBOARD = DEPLOY / "grafana/roster.json"
ALERTS = DEPLOY / "prometheus/alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus/alerts.test.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "compose/config.yaml"
TUWUNEL = DEPLOY / "compose/tuwunel-snippet.yaml"
K8S = DEPLOY / "k8s"
UNIT = DEPLOY / "systemd/roster.service"

DURATION_KEYS = {
    ("homeserver", "request_timeout"),
    ("appservice", "txn_retention"),
    ("agents", "poll_interval"),
    ("agents", "removal_grace"),
    ("sync", "interval"),
    ("lifecycle", "avatar_fetch_timeout"),
    ("lifecycle", "avatar_cache_ttl"),
}
# What the dashboard must show (issue 9), by metric family.
DASHBOARD_MUST_USE = [
    "roster_transactions_total",
    "roster_member_transitions_total",
    "roster_actions_total",
    "roster_homeserver_requests_total",
    "roster_homeserver_request_duration_seconds_bucket",
    "roster_sync_runs_total",
    "roster_sync_duration_seconds_bucket",
    "roster_source_polls_total",
    "roster_lifecycle_events_total",
    "roster_lifecycle_lag",
    "roster_lifecycle_stalled_seconds",
    "roster_dead_letters_total",
    "roster_homeserver_ping_last_success_timestamp_seconds",
    "roster_build_info",
]
ALERTS_MUST_EXIST = [
    "RosterLifecycleLagHigh",
    "RosterHomeserverErrors",
    "RosterLifecycleStuck",
    "RosterLifecycleStalled",
    "RosterLifecycleUnassigned",
    "RosterDeadLetters",
    "RosterActionsFailing",
    "RosterSourceErrors",
    "RosterNoHomeserverPing",
    "RosterDown",
]
METRIC_RE = re.compile(r"\broster_[a-z0-9_]+\b")


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def line(self, status, name, detail=""):
        print(f"{status:<4} {name}" + (f": {detail}" if detail else ""), flush=True)

    def ok(self, name, detail=""):
        self.passed += 1
        self.line("ok", name, detail)

    def fail(self, name, detail):
        self.failed += 1
        self.line("FAIL", name, detail)

    def warn(self, name, detail):
        self.line("warn", name, detail)

    def skip(self, name, detail):
        self.line("skip", name, detail)

    def check(self, name, problems, detail=""):
        """ok when `problems` is empty, else one FAIL line listing them."""
        if problems:
            self.fail(name, "; ".join(problems))
        else:
            self.ok(name, detail)


def rel(path):
    return str(Path(path).relative_to(ROOT))


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def output_of(proc):
    lines = []
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and line not in lines:
            lines.append(line)
    return " | ".join(lines[-6:]) if lines else f"exit {proc.returncode}"


# ---------------------------------------------------------------- metric names


def dashboard_exprs(dash):
    """Every PromQL expression in the dashboard: panel targets and query variables."""
    exprs = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if "expr" in target:
                    exprs.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            exprs.append((f"variable {var['name']}", query.get("query", "") if isinstance(query, dict) else query))
    return exprs


def alert_rules():
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc.get("groups", []) for rule in group.get("rules", [])]


def metric_names():
    dash = json.loads(DASHBOARD.read_text())
    names = set()
    for _, expr in dashboard_exprs(dash):
        names.update(METRIC_RE.findall(expr))
    for rule in alert_rules():
        names.update(METRIC_RE.findall(rule["expr"]))
    return sorted(names)


def exported_metric_families():
    """Names registered in src/metrics.rs, with the `roster_` prefix (None if unreadable)."""
    source = ROOT / "src/metrics.rs"
    if not source.exists():
        return None
    text = source.read_text()
    return {"roster_" + n for n in re.findall(r'register\(\s*"([a-z0-9_]+)"', text)}


def family_of(sample, families):
    for suffix in ("", "_total", "_bucket", "_sum", "_count", "_info", "_created"):
        if suffix and not sample.endswith(suffix):
            continue
        base = sample[: len(sample) - len(suffix)] if suffix else sample
        if base in families:
            return base
    return None


# ---------------------------------------------------------------- roster config


def example_config_keys():
    """Every (section, key) of config.example.yaml, which roster's own tests keep complete."""
    block = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    return {(s, k) for s, body in block.items() for k in (body or {})}


def check_roster_config(report, name, text, allowed, *, service_hosts=None):
    problems = []
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        report.fail(name, f"not YAML: {e}")
        return None
    if not isinstance(config, dict):
        report.fail(name, "not a mapping of sections")
        return None
    for section, body in config.items():
        if not isinstance(body, dict):
            problems.append(f"{section} is not a mapping")
            continue
        for key, value in body.items():
            if allowed is not None and (section, key) not in allowed:
                problems.append(f"unknown key {section}.{key} (roster rejects unknown keys)")
            if (section, key) in DURATION_KEYS and not re.fullmatch(r"\d+(ms|s|m|h|d)?", str(value)):
                problems.append(f"{section}.{key}={value!r} is not a duration")
    get = lambda s, k: (config.get(s) or {}).get(k)  # noqa: E731
    if not get("homeserver", "server_name"):
        problems.append("homeserver.server_name is required")
    if get("homeserver", "flavor") not in (None, "auto", "synapse", "tuwunel"):
        problems.append("homeserver.flavor must be auto, synapse or tuwunel")
    for key in (("appservice", "listen"), ("admin", "listen")):
        listen = str(get(*key) or "")
        if not re.fullmatch(r"(0\.0\.0\.0|\[::\]):\d+", listen):
            problems.append(f"{'.'.join(key)}={listen!r}: a container must listen on 0.0.0.0 or [::]")
    if get("appservice", "listen") == get("admin", "listen"):
        problems.append("appservice.listen and admin.listen must differ")
    url = str(get("appservice", "url") or "")
    if not re.fullmatch(r"https?://[^/:]+(:\d+)?/?", url) or "0.0.0.0" in url or "[::]" in url:
        problems.append(f"appservice.url={url!r}: the homeserver needs a reachable address, never 0.0.0.0")
    for key in (("store", "path"), ("appservice", "registration")):
        if not str(get(*key) or "").startswith("/"):
            problems.append(f"{'.'.join(key)} should be absolute (the working directory is not the config's)")
    interval = str(get("sync", "interval") or "600s")
    seconds = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", interval)
    if m and int(m.group(1)) * seconds[m.group(2) or "s"] < 60:
        problems.append("sync.interval is below the minimum of 60s")
    if service_hosts is not None:
        hosts = {
            "homeserver.url": re.sub(r"^https?://([^/:]+).*", r"\1", str(get("homeserver", "url"))),
            "appservice.url": re.sub(r"^https?://([^/:]+).*", r"\1", url),
            "lifecycle.brokers": str(get("lifecycle", "brokers")).split(":")[0],
        }
        for key, host in hosts.items():
            if host not in service_hosts:
                problems.append(f"{key} names host {host!r}, which is no service here")
    report.check(name, problems, "keys known to roster, addresses reachable")
    return config


# ---------------------------------------------------------------- the checks


def check_yaml(report, yamllint):
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    problems = []
    for path in files:
        try:
            list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:
            problems.append(f"{rel(path)}: {str(e).splitlines()[0]}")
    report.check("yaml parses", problems, f"{len(files)} files")
    if not yamllint:
        report.fail("yamllint", "not installed (PyPI: yamllint)")
        return
    config = (
        "{extends: default, rules: {line-length: {max: 140}, document-start: disable, "
        "truthy: {check-keys: false}, indentation: {indent-sequences: whatever}, "
        "comments: {min-spaces-from-content: 1}}}"
    )
    proc = run([yamllint, "-f", "parsable", "-d", config, *map(str, files)])
    report.check("yamllint", [output_of(proc)] if proc.returncode else [],
                 "duplicate keys, indentation, syntax")


def check_dockerfile(report, hadolint):
    text = DOCKERFILE.read_text()
    if hadolint:
        proc = run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)])
        report.check("Dockerfile: hadolint", [output_of(proc)] if proc.returncode else [])
    else:
        report.skip("Dockerfile: hadolint", "hadolint could not be installed; structural checks only")
    logical = re.sub(r"\\\n", " ", text)
    instructions = [l.strip() for l in logical.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    froms = [l for l in instructions if l.upper().startswith("FROM ")]
    problems = []
    if len(froms) < 2 or not re.match(r"FROM rust:\S+ AS build$", froms[0], re.I):
        problems.append("first stage must be `FROM rust:... AS build`")
    if froms and not froms[-1].startswith("FROM debian:bookworm-slim"):
        problems.append("runtime stage must be debian:bookworm-slim")
    if "cargo build --release --locked" not in logical:
        problems.append("build step must be `cargo build --release --locked` (as the suite runs it)")
    if "--mount=type=cache" not in logical:
        problems.append("no BuildKit cache mount for the cargo registry/target")
    users = [l.split()[1] for l in instructions if l.upper().startswith("USER ")]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        problems.append("final USER must be non-root")
    elif not users[-1].split(":")[0].isdigit():
        problems.append("USER should be numeric so Kubernetes can verify runAsNonRoot")
    for needle, why in (
        ("HEALTHCHECK", "HEALTHCHECK missing"),
        ('ENTRYPOINT ["roster"]', 'ENTRYPOINT ["roster"] missing'),
        ('CMD ["serve", "-c", "/etc/roster/config.yaml"]', "CMD serve -c /etc/roster/config.yaml missing"),
        ("EXPOSE 9009 9010", "EXPOSE 9009 9010 missing"),
        ("/health", "HEALTHCHECK does not probe /health"),
    ):
        if needle not in logical:
            problems.append(why)
    for copied in re.findall(r"^COPY (?!--from)(.+?) \S+$", logical, re.M):
        for src in copied.split():
            if not (ROOT / src).exists():
                problems.append(f"COPY source {src} does not exist in the repository")
    report.check("Dockerfile: structure", problems, "multi-stage, non-root, healthcheck, cargo build --release --locked")
    report.check("Dockerfile: build context", dockerfile_context_problems(logical),
                 "every file the release build reads is copied; the commit can be named")


# `include_bytes!("...")` / `include_str!("...")`: files compiled into the binary.
INCLUDE_RE = re.compile(r'include_(?:bytes|str)!\(\s*"([^"]+)"\s*\)')


def dockerfile_context_problems(logical):
    """What `cargo build --release` in the build stage would miss: a file outside the COPYed
    paths that non-test code includes, a build script left behind, or no way to pass the
    commit (no .git in the context) to it."""
    copied = []
    for line in re.findall(r"^COPY (?!--from)(.+?) \S+$", logical, re.M):
        copied += [(ROOT / src).resolve() for src in line.split()]

    def is_copied(path):
        return any(path == c or c in path.parents for c in copied)

    problems = []
    for source in sorted((ROOT / "src").rglob("*.rs")):
        text = source.read_text()
        # Test modules sit at the end of a file: what follows the first one is test code.
        shipped = text.split("#[cfg(test)]", 1)[0]
        for included in INCLUDE_RE.findall(shipped):
            path = (source.parent / included).resolve()
            if not is_copied(path):
                problems.append(
                    f"{rel(source)} includes {rel(path)}, which no COPY brings into the build stage")
    build_script = ROOT / "build.rs"
    if build_script.exists():
        if not is_copied(build_script.resolve()):
            problems.append("build.rs is not copied: the image would not name its commit")
        if not re.search(r"^ARG ROSTER_COMMIT\b", logical, re.M):
            problems.append("no `ARG ROSTER_COMMIT`: the context has no .git, so build.rs cannot name the commit")
    return problems


def check_compose(report, check_jsonschema):
    for path in (COMPOSE, TUWUNEL):
        if check_jsonschema:
            proc = run([check_jsonschema, "--builtin-schema", "vendor.compose-spec", str(path)])
            report.check(f"compose schema: {rel(path)}", [output_of(proc)] if proc.returncode else [])
        else:
            report.fail(f"compose schema: {rel(path)}", "check-jsonschema not installed (PyPI)")
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose.get("services", {})
    problems = []
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                if not (COMPOSE.parent / source).exists():
                    problems.append(f"{name}: bind source {source} does not exist")
            elif source not in compose.get("volumes", {}):
                problems.append(f"{name}: volume {source} is not declared")
    build = services.get("roster", {}).get("build", {})
    if not (COMPOSE.parent / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).exists():
        problems.append("roster.build does not point at deploy/Dockerfile")
    synapse_mounts = services.get("synapse", {}).get("volumes", [])
    if not any(v.startswith("roster-registration:") and v.endswith(":ro") for v in synapse_mounts):
        problems.append("Synapse must mount the registration volume read-only")
    roster_mounts = services.get("roster", {}).get("volumes", [])
    if not any(v.startswith("roster-registration:/etc/roster/registration") for v in roster_mounts):
        problems.append("roster must mount the registration volume at /etc/roster/registration")
    for name in ("kafka", "kafka-init"):
        if services.get(name, {}).get("profiles") != ["kafka"]:
            problems.append(f"{name} must be in the `kafka` profile")
    init = " ".join(map(str, services.get("kafka-init", {}).get("command", [])))
    for topic in ("nova.identity.events", "nova.identity.events.dlq"):
        if topic not in init:
            problems.append(f"kafka-init does not create {topic}")
    appservice_file = DEPLOY / "compose/synapse-appservice.yaml"
    listed = yaml.safe_load(appservice_file.read_text()).get("app_service_config_files", [])
    for wanted in ("/roster/registration.yaml", "/roster/registration-acting.yaml"):
        if wanted not in listed:
            problems.append(f"synapse-appservice.yaml does not list {wanted}")
    # tuwunel loads registrations from its admin room: the snippet's steps must print and
    # register both, or roster cannot act as @admin and @nova-* there.
    steps = TUWUNEL.read_text()
    for wanted in ("/etc/roster/registration/registration.yaml",
                   "/etc/roster/registration/registration-acting.yaml"):
        if f"cat roster {wanted}" not in steps:
            problems.append(f"tuwunel-snippet.yaml does not print {wanted} to register it")
    report.check("compose wiring", problems, "mounts, volumes, build, kafka profile, topics, tuwunel steps")
    return set(services)


def check_configs(report, compose_services):
    allowed = example_config_keys()
    check_roster_config(report, "roster config: deploy/compose/config.yaml", COMPOSE_CONFIG.read_text(),
                        allowed, service_hosts=compose_services)
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc:
                docs.setdefault(doc["kind"], []).append((path, doc))
    configmaps = [d for _, d in docs.get("ConfigMap", [])]
    if not configmaps or "config.yaml" not in configmaps[0].get("data", {}):
        report.fail("roster config: k8s ConfigMap", "no ConfigMap with a config.yaml")
        return docs, None
    text = configmaps[0]["data"]["config.yaml"]
    config = check_roster_config(report, "roster config: k8s ConfigMap", text, allowed)
    secrets = []
    for section, key in (("admin", "token"), ("homeserver", "admin_token"), ("agents", "letta_token")):
        if ((config or {}).get(section) or {}).get(key):
            secrets.append(f"{section}.{key} is set in the ConfigMap; tokens belong in the Secret")
    if re.search(r"\b(as_token|hs_token)\b", text):
        secrets.append("registration tokens in the ConfigMap")
    report.check("k8s: no tokens in the ConfigMap", secrets)
    return docs, config


def check_k8s(report, docs, config, kubernetes_validate, kubectl):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization.get("resources", [])
    problems = [f"{r} is listed but missing" for r in resources if not (K8S / r).exists()]
    unlisted = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" and p.name not in resources)
    problems += [f"{name} is not listed in kustomization.yaml" for name in unlisted]
    kinds = sorted(k for k, items in docs.items() for _ in items)
    expected = ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Secret", "Service"]
    if kinds != expected:
        problems.append(f"kinds are {kinds}, expected {expected}")
    report.check("k8s: kustomization and kinds", problems, ", ".join(kinds))

    manifests = [str(K8S / r) for r in resources]
    if kubernetes_validate:
        for version in ("1.27.0", "1.37.0"):
            proc = run([kubernetes_validate, "--strict", "--quiet", "-k", version, *manifests])
            report.check(f"k8s: schema (kubernetes-validate --strict, {version})",
                         [output_of(proc)] if proc.returncode else [])
    else:
        report.fail("k8s: schema", "kubernetes-validate not installed (PyPI)")
    if kubectl:
        proc = run([kubectl, "kustomize", str(K8S)])
        built = [] if proc.returncode else [d for d in yaml.safe_load_all(proc.stdout) if d]
        detail = f"{len(built)} objects in namespace {kustomization.get('namespace')}"
        report.check("k8s: kubectl kustomize builds", [output_of(proc)] if proc.returncode else [], detail)
    else:
        report.skip("k8s: kubectl kustomize builds", "kubectl not found")

    deployment = docs["Deployment"][0][1]
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    container = spec["containers"][0]
    problems = []
    want = lambda cond, why: problems.append(why) if not cond else None  # noqa: E731
    want(deployment["spec"].get("replicas") == 1, "replicas must be 1 (single-writer store)")
    want(deployment["spec"].get("strategy", {}).get("type") == "Recreate", "strategy must be Recreate")
    psc, csc = spec.get("securityContext", {}), container.get("securityContext", {})
    want(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 10001, "pod must run as non-root uid 10001")
    want(psc.get("fsGroup") == 10001, "fsGroup 10001 is needed to read the 0400 registration")
    want(csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
    want(csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false")
    want(csc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities drop ALL")
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    want(ports == {"appservice": 9009, "admin": 9010}, "container ports appservice 9009, admin 9010")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = container.get(probe, {}).get("httpGet", {})
        want(get.get("path") == path and ports.get(get.get("port"), get.get("port")) == 9010,
             f"{probe} must GET {path} on 9010")
    res = container.get("resources", {})
    want(res.get("requests") == {"cpu": "50m", "memory": "128Mi"}, "requests cpu 50m, memory 128Mi")
    want(res.get("limits", {}).get("memory") == "512Mi", "memory limit 512Mi")
    ann = pod["metadata"].get("annotations", {})
    want(ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "9010", "prometheus.io/path": "/metrics"},
         "prometheus.io annotations")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    names = {kind: {d["metadata"]["name"] for _, d in docs.get(kind, [])} for kind in docs}
    cm = volumes.get(mounts.get("/etc/roster", {}).get("name"), {}).get("configMap", {})
    want(cm.get("name") in names.get("ConfigMap", set()), "a ConfigMap of this kustomization at /etc/roster")
    reg = volumes.get(mounts.get("/etc/roster/registration", {}).get("name"), {}).get("secret", {})
    want(reg.get("secretName") in names.get("Secret", set()), "the registration Secret at /etc/roster/registration")
    want(reg.get("defaultMode") == 0o400, "registration Secret defaultMode 0400")
    pvc = volumes.get(mounts.get("/var/lib/roster", {}).get("name"), {}).get("persistentVolumeClaim", {})
    want(pvc.get("claimName") in names.get("PersistentVolumeClaim", set()), "the PVC at /var/lib/roster")
    for source in container.get("envFrom", []):
        want(source.get("secretRef", {}).get("name") in names.get("Secret", set()),
             f"envFrom names a Secret not defined here: {source}")
    report.check("k8s: Deployment", problems, "replicas 1/Recreate, non-root, probes, mounts, resources")

    problems = []
    service = docs["Service"][0][1]
    sports = {p["name"]: (p["port"], p.get("targetPort")) for p in service["spec"]["ports"]}
    want(sports == {"appservice": (9009, "appservice"), "admin": (9010, "admin")},
         "Service ports appservice 9009, admin 9010")
    selector = service["spec"].get("selector", {})
    want(selector and all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items()),
         "Service selector does not match the pod labels")
    want(not service["spec"].get("publishNotReadyAddresses"),
         "publishNotReadyAddresses: /ready no longer waits for the ping; route ready pods only")
    claim = docs["PersistentVolumeClaim"][0][1]["spec"]
    want(claim.get("accessModes") == ["ReadWriteOnce"] and claim["resources"]["requests"]["storage"] == "1Gi",
         "PVC 1Gi ReadWriteOnce")
    if config:
        svc_url = f"http://{service['metadata']['name']}.{kustomization.get('namespace')}.svc:9009"
        want(config["appservice"]["url"] == svc_url, f"appservice.url should be {svc_url}")
        reg_path = config["appservice"]["registration"]
        want(reg_path.startswith("/etc/roster/registration/"), "appservice.registration inside the Secret mount")
        for _, secret in docs.get("Secret", []):
            data = secret.get("stringData", {})
            if Path(reg_path).name in data:
                registration = yaml.safe_load(data[Path(reg_path).name])
                want(registration.get("url") == config["appservice"]["url"], "registration url != appservice.url")
                want(registration.get("sender_localpart") == config["appservice"].get("bot_localpart", "letta"),
                     "registration sender_localpart != appservice.bot_localpart")
                regexes = [n["regex"] for ns in registration.get("namespaces", {}).values() for n in ns or []]
                want(all(r.startswith("^") and r.endswith("$") for r in regexes), "namespace regexes must be anchored")
                break
        else:
            problems.append(f"no Secret holds {Path(reg_path).name}")
    report.check("k8s: Service, PVC, registration wiring", problems)


def check_dashboard(report, promtool):
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        report.fail("grafana: JSON parses", str(e))
        return
    report.ok("grafana: JSON parses")
    problems = []
    if dash.get("schemaVersion") != 39:
        problems.append("schemaVersion must be 39")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no Prometheus datasource variable DS_PROMETHEUS")
    ids, cells = set(), set()
    for panel in dash.get("panels", []):
        pid = panel.get("id")
        if pid in ids:
            problems.append(f"duplicate panel id {pid}")
        ids.add(pid)
        pos = panel.get("gridPos", {})
        if pos.get("x", 0) + pos.get("w", 0) > 24:
            problems.append(f"panel {panel.get('title')!r} is wider than the grid")
        for x in range(pos.get("x", 0), pos.get("x", 0) + pos.get("w", 0)):
            for y in range(pos.get("y", 0), pos.get("y", 0) + pos.get("h", 0)):
                if (x, y) in cells:
                    problems.append(f"panel {panel.get('title')!r} overlaps another")
                    break
                cells.add((x, y))
        if panel.get("type") == "row":
            continue
        sources = [panel.get("datasource", {})] + [t.get("datasource", {}) for t in panel.get("targets", [])]
        if any(s.get("uid") != "${DS_PROMETHEUS}" for s in sources):
            problems.append(f"panel {panel.get('title')!r} does not use ${{DS_PROMETHEUS}}")
        if not panel.get("targets") or not all(t.get("expr") for t in panel["targets"]):
            problems.append(f"panel {panel.get('title')!r} has no query")
    report.check("grafana: structure", sorted(set(problems)),
                 f"{sum(p.get('type') != 'row' for p in dash['panels'])} panels, all on ${{DS_PROMETHEUS}}")
    used = set()
    for _, expr in dashboard_exprs(dash):
        used.update(METRIC_RE.findall(expr))
    report.check("grafana: shows every required metric",
                 [f"{m} not used" for m in DASHBOARD_MUST_USE if m not in used])
    if not promtool:
        report.fail("grafana: PromQL parses", "promtool not found (Debian package prometheus)")
        return
    # promtool has no bare "parse this expression" command in 2.42: wrap each query as a
    # recording rule, with Grafana's variables replaced by what they expand to.
    rules = []
    for i, (title, expr) in enumerate(dashboard_exprs(dash)):
        if expr.startswith("label_values("):
            inner = re.match(r"label_values\((.*),\s*\w+\)$", expr)
            expr = inner.group(1) if inner else expr
        expr = (expr.replace("$__rate_interval", "5m").replace("$__range", "6h")
                .replace("$__interval", "1m").replace("$job", ".*").replace("$instance", ".*"))
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    try:
        proc = run([promtool, "check", "rules", f.name])
    finally:
        os.unlink(f.name)
    report.check("grafana: PromQL parses (promtool)", [output_of(proc)] if proc.returncode else [],
                 f"{len(rules)} queries")


def check_alerts(report, promtool):
    rules = alert_rules()
    names = [r.get("alert") for r in rules]
    problems = [f"{n} missing" for n in ALERTS_MUST_EXIST if n not in names]
    groups = [g["name"] for g in yaml.safe_load(ALERTS.read_text())["groups"]]
    if groups != ["roster"]:
        problems.append(f"expected one rule group `roster`, found {groups}")
    source_text = "\n".join(p.read_text() for p in sorted((ROOT / "src").rglob("*.rs")))
    for rule in rules:
        ann = rule.get("annotations", {})
        if not ann.get("summary") or not ann.get("description"):
            problems.append(f"{rule['alert']}: needs a summary and a description")
        elif not re.search(r'roster status|"[^"]{10,}"', ann["description"]):
            problems.append(f"{rule['alert']}: description names neither `roster status` nor a log line")
        else:
            # An operator greps the log for what the alert quotes: it must be what roster
            # logs, word for word ("cannot ... yet" stands for a family and is left out).
            for quoted in re.findall(r'"([^"]{10,})"', ann["description"]):
                if "..." not in quoted and quoted not in source_text:
                    problems.append(f'{rule["alert"]}: quotes a log line roster does not write: "{quoted}"')
    report.check("alerts: required rules, summaries, descriptions", problems, f"{len(rules)} rules")
    if not promtool:
        report.fail("alerts: promtool", "promtool not found (Debian package prometheus)")
        return
    proc = run([promtool, "check", "rules", str(ALERTS)])
    report.check("alerts: promtool check rules", [output_of(proc)] if proc.returncode else [])
    proc = run([promtool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent)
    report.check("alerts: promtool test rules", [output_of(proc)] if proc.returncode else [],
                 "every alert fires on its series and stays quiet on the others")


def check_metric_names(report):
    names = metric_names()
    families = exported_metric_families()
    if families is None:
        report.skip("metric names vs src/metrics.rs", "src/metrics.rs not found")
        return
    unknown = [name for name in names if not family_of(name, families)]
    report.check("metric names known", [f"{n} is neither exported nor expected" for n in unknown],
                 f"{len(names)} names used by the dashboard and alerts")


def check_systemd(report, systemd_analyze):
    if not systemd_analyze:
        report.fail("systemd: verify", "systemd-analyze not found (Debian: apt-get install systemd)")
        return
    unit = UNIT.read_text()
    exec_paths = set(re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", unit, re.M))
    with tempfile.TemporaryDirectory() as tmp:
        # The real binary is not installed here: point ExecStart at an executable stand-in so
        # that verify judges everything else; any output at all counts as a failure.
        standin = Path(tmp) / "roster"
        standin.write_text("#!/bin/sh\nexit 0\n")
        standin.chmod(0o755)
        copy = Path(tmp) / "roster.service"
        copy.write_text(unit.replace("/usr/local/bin/roster", str(standin)))
        proc = run([systemd_analyze, "verify", str(copy)])
        out = (proc.stdout + proc.stderr).strip()
        report.check("systemd: systemd-analyze verify", [out or f"exit {proc.returncode}"] if (proc.returncode or out) else [],
                     f"{systemd_analyze} verify <copy with ExecStart -> stand-in>")
        # The unit as committed: the only acceptable complaint is the absent binary.
        proc = run([systemd_analyze, "verify", str(UNIT)])
        lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
        other = [l for l in lines if "/usr/local/bin/roster is not executable" not in l]
        report.check("systemd: verify as committed", other, "only the absent /usr/local/bin/roster is reported")
        proc = run([systemd_analyze, "security", "--offline=yes", str(copy)])
        score = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", proc.stdout)
        if score:
            report.ok("systemd: security exposure", f"{score.group(1)} {score.group(2)} (systemd-analyze security --offline=yes)")
        else:
            report.warn("systemd: security exposure", "systemd-analyze security --offline gave no score")
    for path in exec_paths:
        if path not in ("/usr/local/bin/roster", "/bin/kill"):
            report.warn("systemd: Exec paths", f"unexpected executable {path}")


def check_shell(report, shellcheck):
    if not shellcheck:
        report.skip("shellcheck", "not installed")
        return
    script = DEPLOY / "check-artifacts.sh"
    proc = run([shellcheck, "-x", str(script)])
    report.check("shellcheck -x deploy/check-artifacts.sh", [output_of(proc)] if proc.returncode else [])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--metric-names", action="store_true")
    for tool in ("promtool", "hadolint", "yamllint", "check-jsonschema", "kubernetes-validate",
                 "kubectl", "systemd-analyze", "shellcheck"):
        parser.add_argument(f"--{tool}", default="")
    args = parser.parse_args()
    if args.metric_names:
        print("\n".join(metric_names()))
        return 0
    report = Report()

    def guarded(name, check, *check_args, default=None):
        # A file too broken for a check's assumptions is a failure of that check, not a crash.
        try:
            return check(report, *check_args)
        except Exception as e:  # noqa: BLE001
            report.fail(name, f"could not be checked: {type(e).__name__}: {e}")
            return default

    guarded("yaml", check_yaml, args.yamllint)
    guarded("Dockerfile", check_dockerfile, args.hadolint)
    services = guarded("compose", check_compose, args.check_jsonschema, default=set())
    docs, config = guarded("roster config", check_configs, services, default=({}, None))
    guarded("k8s", check_k8s, docs, config, args.kubernetes_validate, args.kubectl)
    guarded("grafana", check_dashboard, args.promtool)
    guarded("alerts", check_alerts, args.promtool)
    guarded("metric names", check_metric_names)
    guarded("systemd", check_systemd, args.systemd_analyze)
    guarded("shellcheck", check_shell, args.shellcheck)
    print(f"check-artifacts: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
