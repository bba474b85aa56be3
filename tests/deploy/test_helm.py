"""The Helm chart (helm/agentproxy), rendered for real by Helm 4.

Both modes over a values matrix: (a) the sidecar included in a user's own Deployment, through a
parent chart built from the chart README's own example, and (b) `example.enabled`. Every
rendered manifest is validated against Kubernetes' schemas (kubernetes-validate, strict), the
invariants a reviewer would check are asserted, and the rendered agentproxy.yaml must pass
`agentproxy validate`. Helm comes from `make helm`; without it these tests fail, never skip.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "agentproxy"
CHART_README = CHART / "README.md"
KUBERNETES_VERSION = "1.35"
NAMESPACE = "tools"
RELEASE = "hr"
# Custom resources: Kubernetes ships no schema for them; they are checked by hand below.
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("security.istio.io/v1", "AuthorizationPolicy"),  # test_decision_service checks its shape
}
HTTP_PORT, ADMIN_PORT, TOOL_PORT = 8080, 9901, 8000
GRPC_PORT, ADMIN_GRPC_PORT = 50051, 9902
# Written into `secrets.files`: it must reach the Secret and nothing else.
SENTINEL = "sentinel-7c1e0f-do-not-leak"

Manifest = dict[str, Any]


def find_helm() -> Path | None:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".cache" / "helm" / "bin" / "helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def helm() -> Path:
    path = find_helm()
    if path is None:
        pytest.fail(
            "helm is missing (no executable at $HELM or .cache/helm/bin/helm): run `make helm`",
            pytrace=False,
        )
    return path


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged into a copy of `base`, maps recursively (as Helm merges values)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def readme_files() -> dict[str, str]:
    """The README's example chart: fenced YAML blocks whose first line is `# <path>`."""
    text = CHART_README.read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r"```yaml\n# (\S+)\n(.*?)```", text, re.S)}


@pytest.fixture(scope="session")
def parent_chart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's "your own chart" example, with this chart as its dependency."""
    parent = tmp_path_factory.mktemp("charts") / "hr-api"
    files = readme_files()
    assert {"Chart.yaml", "values.yaml", "templates/deployment.yaml"} <= files.keys()
    for name, text in files.items():
        (parent / name).parent.mkdir(parents=True, exist_ok=True)
        (parent / name).write_text(text, encoding="utf-8")
    shutil.copytree(CHART, parent / "charts" / "agentproxy")
    return parent


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=60, check=False
    )


def values_args(tmp_path: Path, values: dict[str, Any]) -> list[str]:
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
    path.write_text(json.dumps(values), encoding="utf-8")  # JSON is YAML
    return ["-f", str(path)]


def render(helm: Path, chart: Path, values: dict[str, Any], tmp_path: Path) -> list[Manifest]:
    result = run_helm(
        helm,
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        NAMESPACE,
        *values_args(tmp_path, values),
    )
    assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass(frozen=True)
class Case:
    """One point of the values matrix. `values` are agentproxy's own (nested under
    `agentproxy:` for the parent chart); `kinds` is exactly what must render."""

    name: str
    mode: str  # "example" (the chart alone) or "sidecar" (the README's parent chart)
    values: dict[str, Any]
    kinds: dict[str, int]
    has_secret_files: bool = False
    redis: str = ""  # the store.redis.url the rendered config must carry ("": none)

    def chart(self, parent_chart: Path) -> Path:
        return CHART if self.mode == "example" else parent_chart

    def helm_values(self) -> dict[str, Any]:
        return self.values if self.mode == "example" else {"agentproxy": self.values}


EVERYTHING_ON = {
    "serviceMonitor": {"enabled": True},
    "networkPolicy": {
        "enabled": True,
        "adminFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
    "podDisruptionBudget": {"enabled": True},
}
SECRET_FILES = {"secrets": {"files": {"hr-api-key": SENTINEL}}}
BUNDLED_REDIS_URL = f"redis://{RELEASE}-agentproxy-redis:6379/0"
README_REDIS_URL = "redis://redis.shared.svc:6379/0"
SENTINEL_NODES = ["redis-sentinel-0.redis-sentinel:26379", "redis-sentinel-1.redis-sentinel:26379"]
CLUSTER_NODES = ["redis-cluster-0.redis-cluster:6379", "redis-cluster-1.redis-cluster:6379"]

CASES = [
    Case(
        "example-minimal",
        "example",
        {"example": {"enabled": True}},
        {"ConfigMap": 2, "Secret": 1, "Service": 1, "Deployment": 1},
    ),
    Case(
        "example-everything-bundled-redis",
        "example",
        merge(EVERYTHING_ON, {"example": {"enabled": True}, "redis": {"enabled": True}}),
        {
            "ConfigMap": 2,
            "Secret": 1,
            "Service": 2,
            "Deployment": 2,
            "ServiceMonitor": 1,
            "NetworkPolicy": 2,
            "PodDisruptionBudget": 1,
        },
        redis=BUNDLED_REDIS_URL,
    ),
    Case(
        "example-redis-url-secret-files",
        "example",
        merge(
            SECRET_FILES,
            {"example": {"enabled": True}, "redis": {"url": "redis://redis.shared:6379/1"}},
        ),
        {"ConfigMap": 2, "Secret": 1, "Service": 1, "Deployment": 1},
        has_secret_files=True,
        redis="redis://redis.shared:6379/1",
    ),
    Case(
        "sidecar-readme",
        "sidecar",
        {},
        {
            "ConfigMap": 2,
            "Service": 1,
            "Deployment": 1,
            "NetworkPolicy": 1,
            "PodDisruptionBudget": 1,
        },
        redis=README_REDIS_URL,
    ),
    Case(
        "sidecar-everything-bundled-redis",
        "sidecar",
        merge(
            merge(EVERYTHING_ON, SECRET_FILES),
            {
                "redis": {"url": "", "enabled": True},
                "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": "50%"},
                "config": {
                    "audit": {
                        "file": "/var/log/agentproxy/audit.jsonl",
                        "hmac_key_file": "/etc/agentproxy/secrets/audit-hmac",
                    }
                },
            },
        ),
        {
            "ConfigMap": 2,
            "Secret": 1,
            "Service": 2,
            "Deployment": 2,
            "ServiceMonitor": 1,
            "NetworkPolicy": 2,
            "PodDisruptionBudget": 1,
        },
        has_secret_files=True,
        redis=BUNDLED_REDIS_URL,
    ),
    Case(
        "example-grpc-listeners",
        "example",
        merge(
            EVERYTHING_ON,
            {
                "example": {"enabled": True},
                "config": {
                    "listen": {
                        "http": "0.0.0.0:8080",
                        "admin": "0.0.0.0:9901",
                        "grpc": f"0.0.0.0:{GRPC_PORT}",
                        "admin_grpc": f"0.0.0.0:{ADMIN_GRPC_PORT}",
                    }
                },
            },
        ),
        {
            "ConfigMap": 2,
            "Secret": 1,
            "Service": 1,
            "Deployment": 1,
            "ServiceMonitor": 1,
            "NetworkPolicy": 1,
            "PodDisruptionBudget": 1,
        },
    ),
    Case(
        "example-existing-sentinel",
        "example",
        merge(
            SECRET_FILES,
            {
                "example": {"enabled": True},
                "redis": {
                    "sentinel": {"service": "mymaster", "nodes": SENTINEL_NODES},
                    "passwordFile": "hr-api-key",
                },
            },
        ),
        {"ConfigMap": 2, "Secret": 1, "Service": 1, "Deployment": 1},
        has_secret_files=True,
    ),
    Case(
        "example-existing-cluster",
        "example",
        {"example": {"enabled": True}, "redis": {"clusterNodes": CLUSTER_NODES}},
        {"ConfigMap": 2, "Secret": 1, "Service": 1, "Deployment": 1},
    ),
    Case(
        "decision-service-istio",
        "example",
        {
            "decisionService": {
                "enabled": True,
                "istio": {
                    "authorizationPolicy": {
                        "enabled": True,
                        "selector": {"app": "hr-tool"},
                        "rules": [{"to": [{"operation": {"paths": ["/v1/*", "/mcp"]}}]}],
                    }
                },
            },
            "networkPolicy": {"enabled": True},
            "policies": {"p.yaml": "default: deny\nrules: []\n"},
            "config": {
                "identity": {
                    "issuers": [
                        {
                            "issuer": "https://idp.example",
                            "audiences": ["agentproxy"],
                            "jwks_url": "https://idp.example/jwks",
                            "algorithms": ["RS256"],
                        }
                    ]
                }
            },
        },
        {
            "ConfigMap": 2,
            "Service": 1,
            "Deployment": 1,
            "AuthorizationPolicy": 1,
            "NetworkPolicy": 1,
        },
    ),
    Case(
        "sidecar-minimal",
        "sidecar",
        {
            "redis": {"url": ""},
            "secrets": {"existingSecret": ""},
            "service": {"enabled": False},
            "networkPolicy": {"enabled": False},
            "podDisruptionBudget": {"enabled": False},
            "metrics": {"scrapeAnnotations": False},
            "podAnnotations": {"team": "hr"},
            "config": {"upstreams": [{"name": "hr", "url": "http://127.0.0.1:8000"}]},
        },
        {"ConfigMap": 2, "Deployment": 1},
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def rendered(
    request: pytest.FixtureRequest,
    helm: Path,
    parent_chart: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Case, list[Manifest]]:
    case: Case = request.param
    tmp = tmp_path_factory.mktemp(case.name)
    return case, render(helm, case.chart(parent_chart), case.helm_values(), tmp)


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def named(manifests: list[Manifest], kind: str, suffix: str) -> Manifest:
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: found {[m['metadata']['name'] for m in found]}"
    return found[0]


def proxy_pods(manifests: list[Manifest]) -> Iterator[dict[str, Any]]:
    """Pod specs with the agentproxy container."""
    for deployment in of_kind(manifests, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        if any(c["name"] == "agentproxy" for c in spec["containers"]):
            yield deployment["spec"]["template"]


# -- lint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["example", "sidecar"])
def test_helm_lint_passes(mode: str, helm: Path, parent_chart: Path, tmp_path: Path) -> None:
    if mode == "example":
        args = [str(CHART), *values_args(tmp_path, {"example": {"enabled": True}})]
    else:
        args = [str(parent_chart), "--with-subcharts"]
    result = run_helm(helm, "lint", "--strict", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_lint_passes_on_the_chart_defaults(helm: Path) -> None:
    result = run_helm(helm, "lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the values matrix -------------------------------------------------------------------


def test_renders_exactly_the_expected_resources(rendered: tuple[Case, list[Manifest]]) -> None:
    case, manifests = rendered
    assert Counter(m["kind"] for m in manifests) == Counter(case.kinds)
    assert all(m["metadata"].get("namespace") in (None, NAMESPACE) for m in manifests)


def test_every_manifest_is_valid_kubernetes(rendered: tuple[Case, list[Manifest]]) -> None:
    _, manifests = rendered
    for manifest in manifests:
        if (manifest["apiVersion"], manifest["kind"]) in CUSTOM_RESOURCES:
            continue  # no schema in Kubernetes; test_service_monitor checks its shape
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{manifest['kind']}/{manifest['metadata']['name']}: {where}: {exc}")


def test_the_validator_is_not_a_no_op() -> None:
    container: dict[str, Any] = {"name": "c", "image": "i", "imagePullPolicy": 1}
    deployment: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [container]},
            },
        },
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    container.clear()
    container.update({"name": "c", "imaeg": "i"})  # a misspelled field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_proxy_container_is_locked_down_and_probed(
    rendered: tuple[Case, list[Manifest]],
) -> None:
    _, manifests = rendered
    pods = list(proxy_pods(manifests))
    assert len(pods) == 1
    for pod in pods:
        proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "agentproxy")
        security = proxy["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == 10001
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        assert proxy["args"] == ["run", "--config", "/etc/agentproxy/config/agentproxy.yaml"]

        ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
        assert {n: ports[n] for n in ("proxy-http", "proxy-admin")} == {
            "proxy-http": HTTP_PORT,
            "proxy-admin": ADMIN_PORT,
        }  # the gRPC ports: test_only_the_proxy_ports_are_exposed
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = proxy[probe]["httpGet"]
            assert get["path"] == path
            assert ports[get["port"]] == ADMIN_PORT

        # Read-only root: every place the proxy writes is a volume, and every mount exists.
        mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
        assert {"/tmp", "/var/log/agentproxy", "/etc/agentproxy/config"} <= mounts.keys()
        volumes = {v["name"] for v in pod["spec"]["volumes"]}
        assert set(mounts.values()) <= volumes
        assert not any("subPath" in m for m in proxy["volumeMounts"])  # updates must reach it
        # The secrets are the proxy's: no other container mounts them.
        for other in pod["spec"]["containers"]:
            if other["name"] != "agentproxy":
                assert "agentproxy-secrets" not in {
                    m["name"] for m in other.get("volumeMounts", [])
                }


def test_pods_carry_the_selector_label_and_scrape_annotations(
    rendered: tuple[Case, list[Manifest]],
) -> None:
    case, manifests = rendered
    for pod in proxy_pods(manifests):
        assert pod["metadata"]["labels"]["agentproxy/sidecar"] == f"{RELEASE}-agentproxy"
        annotations = pod["metadata"].get("annotations", {})
        if case.values.get("metrics", {}).get("scrapeAnnotations", True):
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
            assert annotations["prometheus.io/path"] == "/metrics"
        else:
            assert not any(k.startswith("prometheus.io/") for k in annotations)


def test_only_the_proxy_ports_are_exposed(rendered: tuple[Case, list[Manifest]]) -> None:
    case, manifests = rendered
    grpc = "grpc" in case.values.get("config", {}).get("listen", {})
    ext_authz = case.values.get("decisionService", {}).get("enabled", False)
    selector = {"agentproxy/sidecar": f"{RELEASE}-agentproxy"}
    for service in of_kind(manifests, "Service"):
        if service["metadata"]["labels"].get("app.kubernetes.io/component") != "proxy":
            continue
        assert service["spec"]["selector"] == selector
        targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
        expected = {"http": "proxy-http", "admin": "proxy-admin"}
        if grpc:
            expected |= {"grpc": "proxy-grpc", "admin-grpc": "proxy-admingrpc"}
        if ext_authz:
            expected |= {"ext-authz": "proxy-extauthz"}
        assert targets == expected
    for pod in proxy_pods(manifests):
        (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "agentproxy"]
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        if grpc:
            assert names["proxy-grpc"] == GRPC_PORT
            assert names["proxy-admingrpc"] == ADMIN_GRPC_PORT
        elif ext_authz:
            assert names == {
                "proxy-http": HTTP_PORT,
                "proxy-admin": ADMIN_PORT,
                "proxy-extauthz": 9191,
            }
        else:
            assert set(names) == {"proxy-http", "proxy-admin"}
    for policy in of_kind(manifests, "NetworkPolicy"):
        if policy["spec"]["podSelector"]["matchLabels"] != selector:
            continue
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        ingress = policy["spec"]["ingress"]
        proxy_ports = sorted(p["port"] for p in ingress[0]["ports"])
        admin_ports = sorted(p["port"] for p in ingress[1]["ports"])
        # never TOOL_PORT; admin ports stay behind networkPolicy.adminFrom
        assert proxy_ports == (
            [HTTP_PORT, GRPC_PORT] if grpc else [HTTP_PORT, 9191] if ext_authz else [HTTP_PORT]
        )
        assert admin_ports == ([ADMIN_PORT, ADMIN_GRPC_PORT] if grpc else [ADMIN_PORT])
    for pdb in of_kind(manifests, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_secret_values_never_reach_a_config_map(rendered: tuple[Case, list[Manifest]]) -> None:
    case, manifests = rendered
    for config_map in of_kind(manifests, "ConfigMap"):
        assert SENTINEL not in yaml.safe_dump(config_map)
    secrets = of_kind(manifests, "Secret")
    if case.has_secret_files:
        data = named(manifests, "Secret", "-secrets")["data"]
        assert base64.b64decode(data["hr-api-key"]).decode() == SENTINEL
    for manifest in manifests:
        if manifest not in secrets:
            assert SENTINEL not in json.dumps(manifest)


def test_the_store_url_comes_from_the_redis_values(
    rendered: tuple[Case, list[Manifest]],
) -> None:
    case, manifests = rendered
    config = yaml.safe_load(named(manifests, "ConfigMap", "-config")["data"]["agentproxy.yaml"])
    assert config.get("store", {}).get("redis", {}).get("url", "") == case.redis
    if case.redis == BUNDLED_REDIS_URL:
        service = named(manifests, "Service", "-redis")
        assert service["metadata"]["name"] == f"{RELEASE}-agentproxy-redis"


def test_the_chart_points_the_store_at_an_existing_sentinel_or_cluster(
    rendered: tuple[Case, list[Manifest]],
) -> None:
    case, manifests = rendered
    config = yaml.safe_load(named(manifests, "ConfigMap", "-config")["data"]["agentproxy.yaml"])
    redis = config.get("store", {}).get("redis", {})
    if case.name == "example-existing-sentinel":
        assert redis == {
            "sentinel": {"service": "mymaster", "nodes": SENTINEL_NODES},
            "password_file": "/etc/agentproxy/secrets/hr-api-key",
        }
    elif case.name == "example-existing-cluster":
        assert redis == {"cluster_nodes": CLUSTER_NODES}
    else:
        assert "sentinel" not in redis and "cluster_nodes" not in redis


def test_service_monitor(rendered: tuple[Case, list[Manifest]]) -> None:
    case, manifests = rendered
    monitors = of_kind(manifests, "ServiceMonitor")
    assert len(monitors) == int(case.values.get("serviceMonitor", {}).get("enabled", False))
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["endpoints"] == [
            {"port": "admin", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
        ]
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        wanted = monitor["spec"]["selector"]["matchLabels"]
        scraped = [
            s
            for s in of_kind(manifests, "Service")
            if wanted.items() <= s["metadata"]["labels"].items()
        ]
        assert len(scraped) == 1
        assert "admin" in {p["name"] for p in scraped[0]["spec"]["ports"]}


# -- the rendered config runs --------------------------------------------------------------


def write_stub(path: Path, key: str) -> None:
    """A file the config names but no rendered manifest holds (an existing Secret's key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if key == "signing_key_file":
        private = ed25519.Ed25519PrivateKey.generate()
        path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    elif key == "public_key_file":
        public = ed25519.Ed25519PrivateKey.generate().public_key()
        path.write_bytes(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    elif key == "jwks_file":
        path.write_text('{"keys": []}', encoding="utf-8")
    else:
        path.write_text("stub-secret-value\n", encoding="utf-8")


FILE_KEYS = frozenset(
    {
        "value_file",
        "hs256_secret_file",
        "public_key_file",
        "jwks_file",
        "signing_key_file",
        "hmac_key_file",
        "secret_file",
        "password_file",
    }
)
MOUNTS = ("/etc/agentproxy/", "/var/log/agentproxy/")


def file_references(node: Any) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in FILE_KEYS and isinstance(value, str):
                yield key, value
            else:
                yield from file_references(value)
    elif isinstance(node, list):
        for item in node:
            yield from file_references(item)


def test_rendered_config_passes_agentproxy_validate(
    rendered: tuple[Case, list[Manifest]], tmp_path: Path
) -> None:
    """The pod's files, laid out under tmp_path as its volumes would be."""
    case, manifests = rendered
    config_text = named(manifests, "ConfigMap", "-config")["data"]["agentproxy.yaml"]
    for mount in MOUNTS:
        (tmp_path / mount.strip("/")).mkdir(parents=True)
        config_text = config_text.replace(mount, f"{tmp_path}{mount}")
    etc = tmp_path / "etc" / "agentproxy"
    (etc / "config").mkdir()
    config_path = etc / "config" / "agentproxy.yaml"
    config_path.write_text(config_text, encoding="utf-8")
    (etc / "policies").mkdir()
    for name, text in named(manifests, "ConfigMap", "-policies")["data"].items():
        (etc / "policies" / name).write_text(text, encoding="utf-8")
    (etc / "secrets").mkdir()  # secrets.mountPath
    for secret in of_kind(manifests, "Secret"):
        for name, value in secret.get("data", {}).items():
            (etc / "secrets" / name).write_bytes(base64.b64decode(value))
    for key, name in file_references(yaml.safe_load(config_text)):
        assert name.startswith(str(tmp_path)), f"{key}: {name} is outside the pod's mounts"
        if not Path(name).exists():
            write_stub(Path(name), key)

    result = subprocess.run(
        [sys.executable, "-m", "agentproxy", "validate", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{case.name}: {result.stdout}{result.stderr}"
    assert ": ok (" in result.stdout


# -- values the chart refuses --------------------------------------------------------------

BAD_VALUES = [
    pytest.param({"serviceMonitor": {"enabled": "yes"}}, "want boolean", id="bool-as-string"),
    pytest.param({"replicaCount": 2}, "additional properties", id="unknown-top-level-key"),
    pytest.param({"image": {"tag": 1}}, "want string", id="tag-as-number"),
    pytest.param({"networkPolicy": {"enable": True}}, "additional properties", id="typo"),
    pytest.param({"policies": {"hr.yml": "default: deny"}}, "hr.yml", id="policy-file-name"),
    pytest.param({"redis": {"url": "http://redis:6379"}}, "/redis/url", id="redis-url-scheme"),
    pytest.param({"redis": {"clusterNodes": ["redis"]}}, "/redis/clusterNodes/0", id="node"),
    pytest.param(
        {"redis": {"sentinel": {"service": "m", "hosts": []}}}, "additional properties", id="s"
    ),
    pytest.param({"config": {"listen": {"http": "8080"}}}, "/config/listen/http", id="listen"),
    pytest.param({"config": {"mode": "audit"}}, "/config/mode", id="config-mode"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES)
def test_schema_rejects_bad_values(
    values: dict[str, Any], message: str, helm: Path, tmp_path: Path
) -> None:
    args = [str(CHART), *values_args(tmp_path, merge({"example": {"enabled": True}}, values))]
    template = run_helm(helm, "template", RELEASE, *args)
    assert template.returncode != 0
    assert "schema" in template.stderr and message in template.stderr, template.stderr
    lint = run_helm(helm, "lint", *args)
    assert lint.returncode != 0
    assert message in lint.stdout + lint.stderr


def test_schema_allows_global(helm: Path, tmp_path: Path) -> None:
    values = {"example": {"enabled": True}, "global": {"imageRegistry": "registry.example.com"}}
    assert render(helm, CHART, values, tmp_path)


REFUSED = [
    pytest.param({}, "config.identity.issuers is empty", id="no-issuer"),
    pytest.param(
        {
            "config": {
                "identity": {
                    "issuers": [
                        {
                            "issuer": "i",
                            "audiences": ["a"],
                            "algorithms": ["RS256"],
                            "jwks_url": "https://i/",
                        }
                    ]
                }
            }
        },
        "policies is empty",
        id="no-policies",
    ),
    pytest.param(
        {"example": {"enabled": True}, "redis": {"url": "redis://:hunter2@redis:6379/0"}},
        "credentials",
        id="redis-password-in-configmap",
    ),
    pytest.param(
        {"example": {"enabled": True}, "redis": {"url": "redis://r:6379", "enabled": True}},
        "not both",
        id="two-redis",
    ),
    pytest.param(
        {
            "example": {"enabled": True},
            "redis": {"enabled": True},
            "config": {"store": {"redis": {"url": "redis://r:6379"}}},
        },
        "set twice",
        id="redis-url-twice",
    ),
    pytest.param(
        {"example": {"enabled": True}, "redis": {"sentinel": {"nodes": SENTINEL_NODES}}},
        "redis.sentinel.service is empty",
        id="sentinel-without-service",
    ),
    pytest.param(
        {
            "example": {"enabled": True},
            "redis": {"sentinel": {"service": "m", "nodes": SENTINEL_NODES}},
            "config": {"store": {"redis": {"cluster_nodes": CLUSTER_NODES}}},
        },
        "set twice",
        id="redis-store-twice",
    ),
    pytest.param(
        {
            "example": {"enabled": True},
            "redis": {"sentinel": {"service": "m", "nodes": SENTINEL_NODES}, "enabled": True},
        },
        "not redis.enabled and redis.sentinel",
        id="bundled-and-sentinel",
    ),
    pytest.param(
        {"example": {"enabled": True}, "redis": {"url": "redis://r:6379", "passwordFile": "p"}},
        "redis.passwordFile is for redis.sentinel or redis.clusterNodes",
        id="password-file-with-url",
    ),
    pytest.param(
        {"example": {"enabled": False}, "serviceMonitor": {"enabled": True}},
        "needs a Service",
        id="service-monitor-without-service",
    ),
    pytest.param(
        {"example": {"enabled": True}, "podDisruptionBudget": {"enabled": True, "minAvailable": 1}},
        "exactly one",
        id="pdb-both",
    ),
]


@pytest.mark.parametrize(("values", "message"), REFUSED)
def test_chart_refuses_incomplete_or_unsafe_values(
    values: dict[str, Any], message: str, helm: Path, tmp_path: Path
) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), *values_args(tmp_path, values))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "hunter2" not in result.stderr


def test_sidecar_template_needs_the_dependency(helm: Path, tmp_path: Path) -> None:
    """Included from a chart without `agentproxy:` values: a message, not a nil pointer."""
    chart = tmp_path / "lonely"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: lonely\nversion: 0.1.0\n")
    (chart / "templates" / "_agentproxy.tpl").write_text(
        (CHART / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    )
    (chart / "templates" / "pod.yaml").write_text(
        'containers:\n{{- include "agentproxy.sidecar" . | nindent 2 }}\n'
    )
    result = run_helm(helm, "template", RELEASE, str(chart))
    assert result.returncode != 0
    assert "add agentproxy to its dependencies" in result.stderr, result.stderr


def test_demo_issuer_secret_is_kept_when_given(helm: Path, tmp_path: Path) -> None:
    values = {"example": {"enabled": True, "hs256Secret": "a-demo-secret-of-32-bytes-or-more"}}
    manifests = render(helm, CHART, values, tmp_path)
    data = named(manifests, "Secret", "-secrets")["data"]
    assert base64.b64decode(data["example-issuer-hs256"]) == b"a-demo-secret-of-32-bytes-or-more"


def test_decision_service(helm: Path, tmp_path: Path) -> None:
    """Mode (c): agentproxy alone in its pod, ext_authz on, and Istio's CUSTOM policy naming
    the provider NOTES tells the mesh config to add."""
    (case,) = [c for c in CASES if c.name == "decision-service-istio"]
    manifests = render(helm, CHART, case.helm_values(), tmp_path)
    (deployment,) = of_kind(manifests, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agentproxy"]  # no tool in this pod
    config = yaml.safe_load(named(manifests, "ConfigMap", "-config")["data"]["agentproxy.yaml"])
    assert config["listen"]["ext_authz"] == "0.0.0.0:9191"
    (policy,) = of_kind(manifests, "AuthorizationPolicy")
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"] == {"name": "agentproxy"}
    assert policy["spec"]["selector"] == {"matchLabels": {"app": "hr-tool"}}
    assert policy["spec"]["rules"] == [{"to": [{"operation": {"paths": ["/v1/*", "/mcp"]}}]}]
    notes = subprocess.run(
        [str(helm), "install", RELEASE, str(CHART), "--dry-run=client", "-n", NAMESPACE, "-f", "-"],
        input=yaml.safe_dump(case.helm_values()),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (
        "envoyExtAuthzGrpc:" in notes and f"service: {RELEASE}-agentproxy.{NAMESPACE}.svc" in notes
    )
    both = {**case.helm_values(), "example": {"enabled": True}}
    failed = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "-f", "-"],
        input=yaml.safe_dump(both),
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode != 0 and "two modes" in failed.stderr
