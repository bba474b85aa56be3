"""The one loader behind `validate`, start and reload.

It reads `agentproxy.yaml` and the policy files it names, checks every key and value, reads
secrets from their files, and raises one `ConfigError` holding every problem, sorted, each as
`file:line:column: $.path: what to change`. It does not compile CEL or load keys: the policy
compiler and the identity layer report those problems in the same format.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from agentproxy.config.model import (
    SCOPE_TOKEN,
    AdminSettings,
    ApprovalsSettings,
    AuditConfig,
    ClaimNames,
    Config,
    ContextToken,
    Cors,
    Credentials,
    HostPort,
    Identity,
    Issuer,
    Listen,
    MeteringSettings,
    OpenApiOperation,
    PolicyFile,
    Price,
    PrincipalRef,
    RedisSettings,
    ResourceAuthorization,
    Secret,
    SentinelSettings,
    StoreSettings,
    StsSettings,
    TelemetrySettings,
    TokenExchange,
    Upstream,
    Webhook,
    redact_url,
)
from agentproxy.config.openapi import OpenApiError, operations_of
from agentproxy.config.policies import CURRENCY, load_policies
from agentproxy.config.sts import read_sts
from agentproxy.config.yamldoc import ConfigError, Document, Issue
from agentproxy.core import Mode

TOP_KEYS = (
    "mode",
    "listen",
    "upstreams",
    "identity",
    "context_token",
    "policy_files",
    "decision_log",
    "store",
    "admin",
    "audit",
    "approvals",
    "metering",
    "telemetry",
    "sts",
)
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# An origin as browsers serialize it (RFC 6454 §6.1): scheme, host and a non-default port.
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9]"
    r"(?:[a-z0-9-]{0,61}[a-z0-9])?)*|\[[0-9a-f:.]+\])(?::(?P<port>[1-9][0-9]{0,4}))?"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_FORWARDED_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_SERVICE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_SECRET_FILE_LIMIT = 64 * 1024


PolicyChecker = Callable[[tuple[PolicyFile, ...]], list[Issue]]


def load(path: str | Path, *, check_policies: PolicyChecker | None = None) -> Config:
    """Loads and checks a config file and its policy files.

    `check_policies` (the policy compiler, injected so that config imports nothing) runs on
    the policy files even when the config has problems, so that one run reports them all.
    Raises ConfigError with every problem found (never the first one alone).
    """
    # Not resolve(): a ConfigMap mounts the file as a symlink whose target changes on every
    # update; relative paths and the reload watcher must follow the name, not one target.
    source = Path(path).absolute()
    issues: list[Issue] = []
    doc = Document(str(path), issues)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Issue(str(path), 1, 1, "", f"cannot read config: {exc}")]) from None
    parsed = doc.parse(text)
    if issues:
        raise ConfigError(issues)  # the rest would only be noise about what could not be read
    raw = doc.mapping(parsed, "$", TOP_KEYS)
    base = source.parent
    loader = _Loader(doc, base)
    globs = doc.strings(raw, "$", "policy_files", required=True)
    if raw.get("decision_log") is False:
        raw["decision_log"] = "off"  # YAML 1.1 reads a bare `off` as false
    config = Config(
        source=source,
        policy_globs=globs,
        mode=Mode(doc.choice(raw, "$", "mode", [m.value for m in Mode], "enforce")),
        listen=loader.listen(raw.get("listen")),
        upstreams=loader.upstreams(raw.get("upstreams")),
        identity=loader.identity(raw.get("identity")),
        context_token=loader.context_token(raw.get("context_token")),
        policy_files=(),
        store=loader.store(raw.get("store")),
        admin=AdminSettings(operators=loader.operators(raw.get("admin"))),
        approvals=loader.approvals(raw.get("approvals")),
        metering=loader.metering(raw.get("metering")),
        telemetry=loader.telemetry(raw.get("telemetry")),
        audit=loader.audit(raw.get("audit"), store_redis=_redis_section(raw)),
        decision_log=doc.choice(raw, "$", "decision_log", ["stdout", "stderr", "off"], "stdout"),  # type: ignore[arg-type]
    )
    sts_section = raw.get("sts")
    sts = read_sts(
        sts_section,
        doc,
        base,
        issues,
        key_file=loader.existing_file(sts_section, "$.sts", "signing_key_file")
        if isinstance(sts_section, dict)
        else None,
    )
    if sts is not None:
        _check_sts(sts, config, doc, issues)
    files = load_policies(globs, base, doc, issues, exclude=source)
    config = replace(config, policy_files=name_operations(files, config.upstreams, issues), sts=sts)
    if check_policies is not None:
        issues.extend(check_policies(config.policy_files))
    if issues:
        raise ConfigError(issues)
    return config


def name_operations(
    files: tuple[PolicyFile, ...], upstreams: tuple[Upstream, ...], issues: list[Issue]
) -> tuple[PolicyFile, ...]:
    """The policy files with every `http:OPERATION_ID` action written as the operation's
    `http:METHOD /path` (from the upstreams' OpenAPI specs). An id no spec has, or two specs
    have, is an issue at its rule."""
    by_id: dict[str, list[tuple[str, OpenApiOperation]]] = {}
    for upstream in upstreams:
        for operation in upstream.openapi:
            by_id.setdefault(operation.id, []).append((upstream.name, operation))
    out = []
    for policy in files:
        rules = []
        for rule in policy.rules:
            actions = []
            for action in rule.actions:
                op_id = action.removeprefix("http:")
                if not action.startswith("http:") or " " in op_id or not op_id:
                    actions.append(action)
                    continue
                found = by_id.get(op_id, [])
                if len(found) == 1:
                    actions.append(found[0][1].action)
                    continue
                pos = rule.position
                specs = ", ".join(sorted(u.name for u in upstreams if u.openapi)) or "none"
                why = (
                    f"is an operationId of upstreams {', '.join(u for u, _ in found)}: scope "
                    "it with the http:METHOD /path form"
                    if found
                    else f'is "http:METHOD /path", or an operationId of an upstream with '
                    f"openapi: (upstreams with a spec: {specs})"
                )
                issues.append(
                    Issue(
                        pos.file,
                        pos.line,
                        pos.column,
                        f"rule {rule.id}.actions",
                        f"{action!r} {why}",
                    )
                )
                actions.append(action)
            rules.append(replace(rule, actions=tuple(actions)))
        out.append(replace(policy, rules=tuple(rules)))
    return tuple(out)


class _Loader:
    def __init__(self, doc: Document, base: Path) -> None:
        self.doc = doc
        self.base = base

    def path(self, value: str) -> Path:
        return (self.base / value).resolve()

    def secret(
        self, section: dict[str, Any], path: str, key: str, *, required: bool
    ) -> Secret | None:
        name = self.doc.get(section, path, key, str, required=required)
        if name is None:
            return None
        file = self.path(name)
        try:
            data = file.read_bytes()
        except OSError as exc:
            self.doc.error(f"{path}.{key}", f"cannot read secret file {name!r}: {exc.strerror}")
            return None
        if len(data) > _SECRET_FILE_LIMIT:
            self.doc.error(f"{path}.{key}", f"secret file {name!r} is larger than 64 KiB")
            return None
        # Kubernetes secret mounts and `echo` leave a trailing newline that is not part of it.
        data = data.rstrip(b"\r\n")
        if not data:
            self.doc.error(f"{path}.{key}", f"secret file {name!r} is empty")
            return None
        return Secret(data, str(file))

    def resource(
        self, section: dict[str, Any], path: str, protocol: str
    ) -> tuple[tuple[str, ...], ResourceAuthorization | None, str]:
        """An upstream as an OAuth protected resource: `audiences` (RFC 8707),
        `authorization` (RFC 9728 metadata) and, for MCP, `scope_challenge`."""
        doc = self.doc
        audiences = tuple(doc.strings(section, path, "audiences"))
        for i, uri in enumerate(audiences):
            parts = urlsplit(uri)
            doc.check(
                parts.scheme in ("http", "https")
                and bool(parts.netloc)
                and not parts.fragment
                and not parts.query,
                f"{path}.audiences[{i}]",
                f"must be the resource's absolute http(s) URI without query or fragment "
                f"(RFC 8707 §2), e.g. https://tools.example/hr/mcp, not {uri!r}",
            )
        apath = f"{path}.authorization"
        auth = doc.mapping(section.get("authorization"), apath, ("servers", "scopes_supported"))
        authorization = None
        if "authorization" in section:
            doc.check(
                protocol in ("http", "mcp"),
                apath,
                "is for HTTP and MCP upstreams (RFC 9728 metadata is served over HTTP)",
            )
            doc.check(
                bool(audiences),
                apath,
                "needs audiences: the first is the resource URI clients ask tokens for "
                "(RFC 8707), published as the metadata's `resource`",
            )
            servers = tuple(doc.strings(auth, apath, "servers"))
            doc.check(bool(servers), f"{apath}.servers", "name at least one authorization server")
            for i, server in enumerate(servers):
                doc.check(
                    urlsplit(server).scheme in ("http", "https") and bool(urlsplit(server).netloc),
                    f"{apath}.servers[{i}]",
                    f"must be an authorization server's issuer URL, not {server!r}",
                )
            scopes = tuple(doc.strings(auth, apath, "scopes_supported"))
            for i, scope in enumerate(scopes):
                doc.check(
                    bool(SCOPE_TOKEN.fullmatch(scope)),
                    f"{apath}.scopes_supported[{i}]",
                    f"{scope!r} is not a scope token (RFC 6749 §3.3)",
                )
            authorization = ResourceAuthorization(servers, scopes)
        challenge = doc.choice(section, path, "scope_challenge", ["http403", "jsonrpc"], "http403")
        doc.check(
            "scope_challenge" not in section or protocol == "mcp",
            f"{path}.scope_challenge",
            "is for MCP upstreams",
        )
        return audiences, authorization, challenge

    def token_exchange(self, value: Any, path: str) -> TokenExchange | None:
        """`credentials.token_exchange`: where and as whom the proxy exchanges the caller's
        token for the upstream's. The client secret travels to `token_url`, so that is https
        (plain http only to a loopback address, a sidecar's own token service)."""
        doc = self.doc
        keys = (
            "token_url",
            "client_id",
            "client_secret_file",
            "audience",
            "resource",
            "scope",
            "header",
            "prefix",
            "auth_method",
            "timeout",
        )
        section = doc.mapping(value, path, keys)
        url = doc.get(section, path, "token_url", str, required=True) or ""
        if url:
            doc.check(
                _token_url_ok(url),
                f"{path}.token_url",
                f"must be an https URL (http only to 127.0.0.1, ::1 or localhost), not {url!r}",
            )
        client_id = doc.get(section, path, "client_id", str, required=True) or ""
        secret = self.secret(section, path, "client_secret_file", required=True)
        audience = doc.get(section, path, "audience", str)
        resource = doc.get(section, path, "resource", str)
        doc.check(
            audience is not None or resource is not None,
            path,
            "needs an audience or a resource (RFC 8707): the upstream the new token is for",
        )
        if resource is not None:
            parts = urlsplit(resource)
            doc.check(
                bool(parts.scheme and parts.netloc) and not parts.fragment,
                f"{path}.resource",
                f"must be an absolute URI without a fragment (RFC 8707 §2), not {resource!r}",
            )
        scope = doc.get(section, path, "scope", str)
        if scope is not None:
            doc.check(
                all(SCOPE_TOKEN.fullmatch(s) for s in scope.split(" ")),
                f"{path}.scope",
                "must be scope tokens separated by single spaces (RFC 6749 §3.3)",
            )
        header = doc.get(section, path, "header", str, "Authorization") or ""
        doc.check(
            bool(_HEADER_NAME.fullmatch(header)), f"{path}.header", "must be an HTTP header name"
        )
        prefix = doc.get(section, path, "prefix", str)
        if prefix is None:
            prefix = "Bearer " if header.lower() == "authorization" else ""
        method = doc.choice(
            section,
            path,
            "auth_method",
            ["client_secret_basic", "client_secret_post"],
            "client_secret_basic",
        )
        timeout = doc.duration(section, path, "timeout", 5.0)
        doc.check(0 < timeout <= 60, f"{path}.timeout", "must be more than 0 and at most 60s")
        if not (url and client_id and secret is not None):
            return None
        return TokenExchange(
            token_url=url,
            client_id=client_id,
            client_secret=secret,
            audience=audience,
            resource=resource,
            scope=scope,
            header=header,
            prefix=prefix,
            auth_method=method,  # type: ignore[arg-type]
            timeout=timeout,
        )

    def existing_file(self, section: dict[str, Any], path: str, key: str) -> Path | None:
        name = self.doc.get(section, path, key, str)
        if name is None:
            return None
        file = self.path(name)
        if not file.is_file():
            self.doc.error(f"{path}.{key}", f"file {name!r} does not exist (resolved to {file})")
            return None
        return file

    def openapi(self, file: Path, path: str, base_path: str) -> tuple[OpenApiOperation, ...]:
        try:
            spec = yaml.safe_load(file.read_text(encoding="utf-8"))  # JSON is YAML too
            return operations_of(spec, base_path)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            self.doc.error(path, f"cannot read {file.name}: {exc}")
        except OpenApiError as exc:
            self.doc.error(path, f"{file.name}: {exc}")
        return ()

    def listen(self, value: Any) -> Listen:
        doc = self.doc
        section = doc.mapping(
            value,
            "$.listen",
            (
                "http",
                "admin",
                "grpc",
                "admin_grpc",
                "ext_authz",
                "max_connections",
                "header_timeout",
                "idle_timeout",
                "body_timeout",
            ),
        )
        max_connections = doc.get(section, "$.listen", "max_connections", int, 10_000) or 0
        doc.check(
            max_connections >= 1,
            "$.listen.max_connections",
            "must be at least 1 (open client connections per data-plane listener)",
        )
        timeouts = {}
        for key, default in (
            ("header_timeout", 10.0),
            ("idle_timeout", 60.0),
            ("body_timeout", 10.0),
        ):
            timeouts[key] = doc.duration(section, "$.listen", key, default)
            doc.check(timeouts[key] > 0, f"$.listen.{key}", "must be more than 0")
        return Listen(
            max_connections=max_connections,
            **timeouts,
            http=self.host_port(section, "$.listen", "http", "0.0.0.0:8080"),
            admin=self.host_port(section, "$.listen", "admin", "0.0.0.0:9901"),
            grpc=self.host_port(section, "$.listen", "grpc") if "grpc" in section else None,
            admin_grpc=(
                self.host_port(section, "$.listen", "admin_grpc")
                if "admin_grpc" in section
                else None
            ),
            ext_authz=(
                self.host_port(section, "$.listen", "ext_authz") if "ext_authz" in section else None
            ),
        )

    def host_port(
        self, section: dict[str, Any], path: str, key: str, default: str = "0.0.0.0:0"
    ) -> HostPort:
        text = self.doc.get(section, path, key, str, default) or default
        parsed = parse_host_port(text)
        if parsed is None:
            self.doc.error(
                f"{path}.{key}",
                f'invalid address {text!r} (write "host:port", e.g. "0.0.0.0:8080")',
            )
            return parse_host_port(default)  # type: ignore[return-value]
        return parsed

    def upstreams(self, value: Any) -> tuple[Upstream, ...]:
        doc = self.doc
        items = doc.each(value, "$.upstreams", self.upstream)
        if value is None:
            doc.error("$", 'missing required key "upstreams" (at least one upstream to forward to)')
        seen: set[str] = set()
        services: set[str] = set()
        defaults = {False: 0, True: 0}
        for i, up in enumerate(items):
            if up.name in seen:
                doc.error(f"$.upstreams[{i}].name", f"duplicate upstream name {up.name!r}")
            seen.add(up.name)
            if up.service is not None:
                if up.service in services:
                    doc.error(
                        f"$.upstreams[{i}].match.service",
                        f"service {up.service!r} is already served by another upstream",
                    )
                services.add(up.service)
            defaults[up.is_grpc] += (up.service if up.is_grpc else up.path_prefix) is None
        for grpc, count in defaults.items():
            if count > 1:
                kind = "gRPC upstream" if grpc else "HTTP upstream"
                doc.error(
                    "$.upstreams",
                    f"more than one {kind} has no match: only one may be the default",
                )
        return tuple(items)

    def upstream(self, value: Any, path: str) -> Upstream | None:
        doc = self.doc
        keys = (
            "name",
            "url",
            "protocol",
            "match",
            "timeout",
            "credentials",
            "max_body_bytes",
            "pin_tools",
            "tool_errors",
            "endpoint",
            "descriptor_set",
            "max_message_bytes",
            "forwarded_host",
            "paths",
            "body",
            "max_response_bytes",
            "openapi",
            "audiences",
            "authorization",
            "scope_challenge",
            "cors",
        )
        section = doc.mapping(value, path, keys)
        name = doc.get(section, path, "name", str, required=True) or ""
        doc.check(
            not name or bool(_NAME.fullmatch(name)),
            f"{path}.name",
            "must be lowercase letters, digits, '.', '_' or '-'",
        )
        protocol = doc.choice(section, path, "protocol", ["http", "mcp", "llm", "grpc"], "http")
        grpc = protocol == "grpc"
        url = doc.get(section, path, "url", str, required=True) or ""
        if url:
            doc.check(
                _valid_url(url, grpc),
                f"{path}.url",
                (
                    f'must be "grpc://host:port" (grpcs:// for TLS), not {url!r}'
                    if grpc
                    else f"must be an http(s) URL with a host and no query, not {url!r}"
                ),
            )
        match = doc.mapping(
            section.get("match"), f"{path}.match", ("service",) if grpc else ("path_prefix",)
        )
        prefix = None if grpc else doc.get(match, f"{path}.match", "path_prefix", str)
        service = doc.get(match, f"{path}.match", "service", str) if grpc else None
        if service is not None:
            doc.check(
                bool(_SERVICE.fullmatch(service)),
                f"{path}.match.service",
                f'must be a full service name like "hr.v1.Employees", not {service!r}',
            )
        if prefix is not None:
            doc.check(
                prefix.startswith("/") and "//" not in prefix and "%" not in prefix,
                f"{path}.match.path_prefix",
                "must start with '/' and be a plain path",
            )
            prefix = prefix.rstrip("/") or "/"
        credentials = None
        cpath = f"{path}.credentials"
        creds = doc.mapping(
            section.get("credentials"), cpath, ("header", "value_file", "prefix", "token_exchange")
        )
        exchange = None
        if "token_exchange" in creds:
            doc.check(
                not {"header", "value_file", "prefix"} & creds.keys(),
                cpath,
                "takes either a static credential (header, value_file, prefix) or "
                "token_exchange, not both",
            )
            exchange = self.token_exchange(creds["token_exchange"], f"{cpath}.token_exchange")
        elif creds:
            header = doc.get(creds, cpath, "header", str, required=True) or ""
            doc.check(
                not header or bool(_HEADER_NAME.fullmatch(header)),
                f"{cpath}.header",
                "must be an HTTP header name",
            )
            secret = self.secret(creds, cpath, "value_file", required=True)
            if header and secret is not None:
                credentials = Credentials(
                    header, secret, doc.get(creds, cpath, "prefix", str, "") or ""
                )
        audiences, authorization, scope_challenge = self.resource(section, path, protocol)
        max_body = doc.get(section, path, "max_body_bytes", int) or 0
        doc.check(
            section.get("max_body_bytes") is None or max_body > 0,
            f"{path}.max_body_bytes",
            "must be a positive number of bytes",
        )
        timeout = doc.duration(section, path, "timeout", 30.0)
        doc.check(timeout > 0, f"{path}.timeout", "must be more than 0")
        pin_tools = doc.choice(section, path, "pin_tools", ["off", "report", "enforce"], "report")
        tool_errors = doc.choice(section, path, "tool_errors", ["jsonrpc", "result"], "jsonrpc")
        for key in ("pin_tools", "tool_errors", "endpoint"):
            doc.check(
                key not in section or protocol == "mcp",
                f"{path}.{key}",
                "applies to protocol: mcp only",
            )
        endpoint = doc.get(section, path, "endpoint", str, "/mcp") or "/mcp"
        doc.check(
            endpoint.startswith("/") and _is_plain_path(endpoint),
            f"{path}.endpoint",
            'must be the MCP endpoint\'s path as agents send it, e.g. "/mcp"',
        )
        for key in ("descriptor_set", "max_message_bytes"):
            doc.check(key not in section or grpc, f"{path}.{key}", "applies to protocol: grpc only")
        doc.check(
            "max_body_bytes" not in section or not grpc,
            f"{path}.max_body_bytes",
            "applies to HTTP protocols; a gRPC upstream has max_message_bytes",
        )
        max_message = doc.get(section, path, "max_message_bytes", int, 4 * 1024 * 1024) or 0
        doc.check(
            0 < max_message <= 2**31 - 1,
            f"{path}.max_message_bytes",
            "must be a positive number of bytes below 2 GiB",
        )
        reflection = section.get("descriptor_set") == "reflection"
        descriptor_set = None if reflection else self.existing_file(section, path, "descriptor_set")
        forwarded_host = doc.get(section, path, "forwarded_host", str)
        doc.check(
            forwarded_host is None or bool(_FORWARDED_HOST.fullmatch(forwarded_host)),
            f"{path}.forwarded_host",
            'must be a host[:port] such as "api.example.com" (sent as X-Forwarded-Host)',
        )
        ppath = f"{path}.paths"
        paths = doc.mapping(
            section.get("paths"), ppath, ("case", "integer_segments", "trailing_slash")
        )
        slash = doc.choice(paths, ppath, "trailing_slash", ["as_sent", "ignored"], "as_sent")
        case = doc.choice(paths, ppath, "case", ["sensitive", "insensitive"], "sensitive")
        integers = doc.choice(paths, ppath, "integer_segments", ["as_sent", "canonical"], "as_sent")
        for key in ("forwarded_host", "paths"):
            doc.check(key not in section or not grpc, f"{path}.{key}", "applies to HTTP protocols")
        body = doc.choice(section, path, "body", ["auto", "json", "form", "stream"], "auto")
        for key in ("body", "max_response_bytes", "openapi"):
            doc.check(
                key not in section or protocol == "http",
                f"{path}.{key}",
                "applies to protocol: http only (MCP, LLM and gRPC bodies are always read)",
            )
        max_response = doc.get(section, path, "max_response_bytes", int, 16 * 1024 * 1024) or 0
        doc.check(
            max_response > 0,
            f"{path}.max_response_bytes",
            "must be a positive number of bytes (the largest answer a rule's obligations shape)",
        )
        cors = self.cors(section.get("cors"), f"{path}.cors")
        doc.check("cors" not in section or not grpc, f"{path}.cors", "applies to HTTP protocols")
        operations: tuple[OpenApiOperation, ...] = ()
        spec_file = self.existing_file(section, path, "openapi")
        if spec_file is not None and url:
            operations = self.openapi(spec_file, f"{path}.openapi", urlsplit(url).path)
        return Upstream(
            cors=cors,
            openapi=operations,
            body=body,  # type: ignore[arg-type]
            max_response_bytes=max_response,
            forwarded_host=forwarded_host,
            path_case=case,  # type: ignore[arg-type]
            integer_segments=integers,  # type: ignore[arg-type]
            trailing_slash=slash,  # type: ignore[arg-type]
            service=service,
            descriptor_set=descriptor_set,
            reflection=reflection,
            max_message_bytes=max_message,
            pin_tools=pin_tools,  # type: ignore[arg-type]
            tool_errors=tool_errors,  # type: ignore[arg-type]
            endpoint=endpoint,
            name=name,
            url=url.rstrip("/"),
            protocol=protocol,  # type: ignore[arg-type]
            path_prefix=prefix,
            timeout=timeout,
            credentials=credentials,
            token_exchange=exchange,
            audiences=audiences,
            authorization=authorization,
            scope_challenge=scope_challenge,  # type: ignore[arg-type]
            max_body_bytes=max(max_body, 0),  # 0: the protocol's default
        )

    def cors(self, value: Any, path: str) -> Cors | None:
        """`cors: {allow_origins: [...]}`. Each origin must be written as a browser sends it
        (compared exactly); `*` is refused: the MCP spec has servers validate `Origin`
        against DNS rebinding, and `*` would let any page a user opens drive the upstream
        with whatever token it gets hold of."""
        doc = self.doc
        if value is None:
            return None
        section = doc.mapping(value, path, ("allow_origins",))
        if not isinstance(value, dict):
            return None
        origins = doc.strings(section, path, "allow_origins", required=True)
        if not origins:
            if "allow_origins" in section:
                doc.error(f"{path}.allow_origins", "must list at least one origin")
            return None
        ok = True
        for i, origin in enumerate(origins):
            problem = _origin_problem(origin)
            if problem is None and origin in origins[:i]:
                problem = f"{origin!r} is listed twice"
            if problem is not None:
                doc.error(f"{path}.allow_origins[{i}]", problem)
                ok = False
        return Cors(origins) if ok else None

    def identity(self, value: Any) -> Identity:
        doc = self.doc
        section = doc.mapping(
            value, "$.identity", ("issuers", "claims", "max_token_bytes", "task_from")
        )
        if value is None:
            doc.error(
                "$", 'missing required key "identity" (every call must carry a verified token)'
            )
        issuers = doc.each(section.get("issuers"), "$.identity.issuers", self.issuer)
        if value is not None and not section.get("issuers"):
            doc.error("$.identity", "at least one issuer is required in identity.issuers")
        names = [i.issuer for i in issuers]
        for dup in {n for n in names if names.count(n) > 1}:
            doc.error("$.identity.issuers", f"issuer {dup!r} is configured twice")
        cpath = "$.identity.claims"
        claims = doc.mapping(
            section.get("claims"), cpath, ("agent", "roles", "task", "parent_task", "scopes")
        )
        names_cfg = ClaimNames(
            agent=doc.get(claims, cpath, "agent", str, "sub") or "sub",
            roles=doc.get(claims, cpath, "roles", str, "roles") or "roles",
            task=doc.get(claims, cpath, "task", str, "task") or "task",
            parent_task=doc.get(claims, cpath, "parent_task", str, "parent_task") or "parent_task",
            scopes=doc.get(claims, cpath, "scopes", str, "scope") or "scope",
        )
        for key in ("agent", "roles", "task", "parent_task", "scopes"):
            claim = getattr(names_cfg, key)
            doc.check(
                _claim_path_readable(claim),
                f"{cpath}.{key}",
                f"{claim!r} is not a claim name or a dotted path to one (realm_access.roles): "
                "no token would ever have it, so every call would be refused",
            )
        max_bytes = doc.get(section, "$.identity", "max_token_bytes", int, 8192) or 8192
        sources = doc.strings(section, "$.identity", "task_from") or ["token", "header"]
        doc.check(
            set(sources) <= {"token", "header"} and len(set(sources)) == len(sources),
            "$.identity.task_from",
            "list the task id's sources in order: [token, header] (the default) or [token]",
        )
        task_from = tuple(s for s in sources if s in ("token", "header"))
        return Identity(tuple(issuers), names_cfg, max_bytes, task_from)  # type: ignore[arg-type]

    def issuer(self, value: Any, path: str) -> Issuer | None:
        doc = self.doc
        keys = (
            "issuer",
            "audiences",
            "algorithms",
            "jwks_url",
            "jwks_file",
            "public_key_file",
            "hs256_secret_file",
            "leeway",
            "discovery",
        )
        section = doc.mapping(value, path, keys)
        name = doc.get(section, path, "issuer", str, required=True)
        audiences = doc.strings(section, path, "audiences", required=True)
        if "audiences" in section and not audiences:
            doc.error(
                f"{path}.audiences",
                "at least one audience is required (a token for another service must not pass)",
            )
        algorithms = doc.strings(section, path, "algorithms", required=True)
        for alg in algorithms:
            doc.check(
                alg in ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS,
                f"{path}.algorithms",
                f"unsupported algorithm {alg!r} (use e.g. RS256, ES256, EdDSA, HS256)",
            )
        discovery = doc.get(section, path, "discovery", bool, False) or False
        sources = [
            k
            for k in ("jwks_url", "jwks_file", "public_key_file", "hs256_secret_file", "discovery")
            if section.get(k)
        ]
        if len(sources) != 1:
            doc.error(
                path,
                "set exactly one of discovery: true, jwks_url, jwks_file, public_key_file,"
                " hs256_secret_file" + (f" (found {', '.join(sources)})" if sources else ""),
            )
        if discovery and name:
            doc.check(
                urlsplit(name).scheme in ("http", "https"),
                f"{path}.discovery",
                "OIDC discovery needs an issuer that is an http(s) URL (its"
                " /.well-known/openid-configuration is read)",
            )
        hmac = bool(section.get("hs256_secret_file"))
        # Key confusion: an HMAC algorithm next to a public key lets anyone who has the
        # public key forge tokens; refuse the mix at load.
        if hmac and set(algorithms) - HMAC_ALGORITHMS:
            doc.error(f"{path}.algorithms", "hs256_secret_file takes only HS256/HS384/HS512")
        if not hmac and set(algorithms) & HMAC_ALGORITHMS:
            doc.error(
                f"{path}.algorithms",
                "HS* algorithms need hs256_secret_file; public keys take RS/PS/ES/EdDSA",
            )
        jwks_url = doc.get(section, path, "jwks_url", str)
        if jwks_url is not None:
            doc.check(
                urlsplit(jwks_url).scheme in ("http", "https"),
                f"{path}.jwks_url",
                "must be an http(s) URL",
            )
        issuer = Issuer(
            issuer=name or "",
            audiences=audiences,
            algorithms=algorithms,
            jwks_url=jwks_url,
            jwks_file=self.existing_file(section, path, "jwks_file"),
            public_key_file=self.existing_file(section, path, "public_key_file"),
            hs256_secret=self.secret(section, path, "hs256_secret_file", required=False),
            leeway=doc.duration(section, path, "leeway", 0.0),
            discovery=discovery,
        )
        return issuer if name else None

    def store(self, value: Any) -> StoreSettings:
        doc = self.doc
        path = "$.store"
        section = doc.mapping(value, path, ("redis", "on_error", "task_ttl"))
        redis = None
        if section.get("redis") is not None:
            redis = self.redis(section["redis"], f"{path}.redis")
        on_error = doc.choice(section, path, "on_error", ["deny", "allow_cached"], "deny")
        ttl = doc.duration(section, path, "task_ttl", 24 * 3600.0)
        doc.check(ttl >= 1, f"{path}.task_ttl", "must be at least 1s")
        return StoreSettings(redis=redis, on_error=on_error, task_ttl=ttl)  # type: ignore[arg-type]

    def redis(self, value: Any, rpath: str) -> RedisSettings:
        """`url`, `sentinel` or `cluster_nodes`: exactly one topology."""
        doc = self.doc
        r = doc.mapping(
            value,
            rpath,
            (
                "url",
                "sentinel",
                "cluster_nodes",
                "password_file",
                "key_prefix",
                "pool_size",
                "pool_timeout",
                "timeout",
                "wait_replicas",
            ),
        )
        url = doc.get(r, rpath, "url", str) or ""
        cluster = doc.strings(r, rpath, "cluster_nodes")
        sentinel = None
        if r.get("sentinel") is not None:
            spath = f"{rpath}.sentinel"
            s = doc.mapping(r["sentinel"], spath, ("service", "nodes", "password_file"))
            service = doc.get(s, spath, "service", str, required=True) or ""
            nodes = doc.strings(s, spath, "nodes", required=True)
            doc.check(bool(nodes) or "nodes" not in s, f"{spath}.nodes", "must name a sentinel")
            for i, node in enumerate(nodes):
                _check_node(doc, f"{spath}.nodes[{i}]", node)
            password = self.secret(s, spath, "password_file", required=False)
            sentinel = SentinelSettings(service=service, nodes=nodes, password=password)
        if "cluster_nodes" in r:
            doc.check(bool(cluster), f"{rpath}.cluster_nodes", "must name a cluster node")
        for i, node in enumerate(cluster):
            _check_node(doc, f"{rpath}.cluster_nodes[{i}]", node)
        given = [k for k in ("url", "sentinel", "cluster_nodes") if r.get(k) is not None]
        if not given:
            doc.error(rpath, 'needs one of "url", "sentinel" or "cluster_nodes"')
        elif len(given) > 1:
            doc.error(f"{rpath}.{given[1]}", f"only one of {', '.join(given)} may be given")
        doc.check(
            not url or urlsplit(url).scheme in ("redis", "rediss", "unix"),
            f"{rpath}.url",
            f"must be a redis://, rediss:// or unix:// URL, not {redact_url(url)!r}",
        )
        password = self.secret(r, rpath, "password_file", required=False)
        if password is not None and url:
            doc.error(f"{rpath}.password_file", "a single Redis takes its password in the url")
        pool = doc.get(r, rpath, "pool_size", int, 20) or 20
        doc.check(pool > 0, f"{rpath}.pool_size", "must be more than 0")
        timeout = doc.duration(r, rpath, "timeout", 0.05)
        doc.check(0 < timeout <= 10, f"{rpath}.timeout", "must be between 1ms and 10s")
        pool_timeout = doc.duration(r, rpath, "pool_timeout", 1.0)
        doc.check(0 < pool_timeout <= 60, f"{rpath}.pool_timeout", "must be between 1ms and 60s")
        wait = doc.get(r, rpath, "wait_replicas", int, 0) or 0
        doc.check(0 <= wait <= 16, f"{rpath}.wait_replicas", "must be between 0 and 16")
        # WAIT counts one connection's writes on one server: a Cluster spreads them.
        doc.check(
            not (wait and cluster),
            f"{rpath}.wait_replicas",
            "is for a single Redis or Sentinel; on a Cluster set min-replicas-to-write on "
            "the masters",
        )
        prefix = doc.get(r, rpath, "key_prefix", str, "agentproxy:") or "agentproxy:"
        # On a Cluster the store wraps the prefix in a hash tag ({prefix}) to keep the keys
        # its scripts touch together in one slot; a brace of the prefix's own would end it.
        doc.check(
            not cluster or not set("{}") & set(prefix),
            f"{rpath}.key_prefix",
            "must not contain { or } on a Redis Cluster (the store makes it a hash tag)",
        )
        return RedisSettings(
            url=url,
            key_prefix=prefix,
            pool_size=pool,
            timeout=timeout,
            sentinel=sentinel,
            cluster_nodes=cluster,
            password=password,
            pool_timeout=pool_timeout,
            wait_replicas=wait,
        )

    def metering(self, value: Any) -> MeteringSettings:
        doc = self.doc
        path = "$.metering"
        section = doc.mapping(
            value, path, ("currency", "prices", "attribution", "default_max_output_tokens")
        )
        currency = doc.get(section, path, "currency", str, "USD") or "USD"
        doc.check(
            bool(CURRENCY.fullmatch(currency)),
            f"{path}.currency",
            "must be an ISO 4217 code (USD)",
        )
        prices: list[tuple[str, Price]] = []
        table = section.get("prices") or {}
        if not isinstance(table, dict):
            doc.error(f"{path}.prices", "must be a mapping of model glob to prices")
            table = {}
        for glob_text, entry in table.items():
            ppath = f"{path}.prices.{glob_text}"
            e = doc.mapping(
                entry,
                ppath,
                ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "max_output_tokens"),
            )
            inp = doc.get(e, ppath, "input_per_mtok", float, required=True)
            out = doc.get(e, ppath, "output_per_mtok", float, 0.0)
            cached = doc.get(e, ppath, "cached_input_per_mtok", float)
            cap = doc.get(e, ppath, "max_output_tokens", int)
            if inp is None:
                continue
            doc.check(
                min(inp, out or 0.0, cached or 0.0) >= 0, ppath, "prices must not be negative"
            )
            doc.check(
                cap is None or cap >= 1,
                f"{ppath}.max_output_tokens",
                "must be at least 1 (the model's largest answer, in tokens)",
            )
            prices.append((str(glob_text), Price(inp, out or 0.0, cached, cap)))
        apath = f"{path}.attribution"
        attribution = doc.mapping(section.get("attribution"), apath, ("labels", "max_values"))
        labels = attribution.get("labels") or {}
        pairs: list[tuple[str, str]] = []
        if not isinstance(labels, dict):
            doc.error(f"{apath}.labels", "must map label names to CEL over the principal")
            labels = {}
        for name, expr in labels.items():
            doc.check(
                bool(_LABEL_NAME.fullmatch(str(name))) and name not in _FIXED_LABELS,
                f"{apath}.labels.{name}",
                f"must be a Prometheus label name other than {', '.join(sorted(_FIXED_LABELS))}",
            )
            if not isinstance(expr, str):
                doc.error(
                    f"{apath}.labels.{name}",
                    "must be a CEL expression (e.g. principal.claims.team)",
                )
                continue
            pairs.append((str(name), expr))
        max_values = doc.get(attribution, apath, "max_values", int, 100) or 100
        doc.check(1 <= max_values <= 10_000, f"{apath}.max_values", "must be between 1 and 10000")
        default_cap = doc.get(section, path, "default_max_output_tokens", int, 4096) or 4096
        doc.check(
            default_cap >= 1,
            f"{path}.default_max_output_tokens",
            "must be at least 1 (reserved for a request that names no max_tokens)",
        )
        return MeteringSettings(currency, tuple(prices), tuple(pairs), max_values, default_cap)

    def telemetry(self, value: Any) -> TelemetrySettings:
        doc = self.doc
        path = "$.telemetry"
        section = doc.mapping(
            value,
            path,
            ("otlp", "sample_ratio", "max_queue_size", "capture_messages", "max_message_bytes"),
        )
        otlp = doc.mapping(section.get("otlp"), f"{path}.otlp", ("endpoint", "protocol"))
        endpoint = doc.get(otlp, f"{path}.otlp", "endpoint", str)
        if endpoint is not None:
            doc.check(
                urlsplit(endpoint).scheme in ("http", "https") and bool(urlsplit(endpoint).netloc),
                f"{path}.otlp.endpoint",
                "must be an http(s) URL (e.g. http://otel-collector:4317)",
            )
        protocol = None
        if "protocol" in otlp:
            protocol = doc.choice(
                otlp, f"{path}.otlp", "protocol", ["grpc", "http/protobuf"], "grpc"
            )
        ratio = doc.get(section, path, "sample_ratio", float)
        doc.check(
            ratio is None or 0.0 <= ratio <= 1.0, f"{path}.sample_ratio", "must be between 0 and 1"
        )
        queue = doc.get(section, path, "max_queue_size", int, 2048)
        queue = 2048 if queue is None else queue
        doc.check(
            1 <= queue <= 1_000_000, f"{path}.max_queue_size", "must be between 1 and 1000000"
        )
        capture = doc.get(section, path, "capture_messages", bool, False)
        limit = doc.get(section, path, "max_message_bytes", int, 16 * 1024)
        limit = 16 * 1024 if limit is None else limit
        doc.check(
            256 <= limit <= 1024 * 1024,
            f"{path}.max_message_bytes",
            "must be between 256 and 1048576",
        )
        return TelemetrySettings(
            endpoint,
            protocol,  # type: ignore[arg-type]
            ratio,
            queue,
            capture_messages=bool(capture),
            max_message_bytes=limit,
        )

    def operators(self, value: Any) -> tuple[str, ...]:
        doc = self.doc
        operators = doc.strings(
            doc.mapping(value, "$.admin", ("operators",)), "$.admin", "operators"
        )
        for i, entry in enumerate(operators):
            try:
                PrincipalRef.parse(entry)
            except ValueError as exc:
                doc.error(f"$.admin.operators[{i}]", str(exc))
        return operators

    def approvals(self, value: Any) -> ApprovalsSettings:
        doc = self.doc
        path = "$.approvals"
        section = doc.mapping(
            value,
            path,
            (
                "webhooks",
                "max_pending",
                "max_pending_per_agent",
                "max_pending_per_user",
                "max_pending_per_rule",
                "ui_url",
            ),
        )
        hooks = doc.each(section.get("webhooks"), f"{path}.webhooks", self.webhook)
        total = doc.get(section, path, "max_pending", int, 1000) or 1000
        per_agent = doc.get(section, path, "max_pending_per_agent", int, 50) or 50
        doc.check(total > 0 and per_agent > 0, path, "max_pending values must be more than 0")
        per_user = doc.get(section, path, "max_pending_per_user", int, 100)
        per_rule = doc.get(section, path, "max_pending_per_rule", int, 0)
        for name, cap in (("max_pending_per_user", per_user), ("max_pending_per_rule", per_rule)):
            doc.check(cap is None or cap >= 0, f"{path}.{name}", "must be 0 (no cap) or more")
        ui_url = doc.get(section, path, "ui_url", str)
        return ApprovalsSettings(
            tuple(hooks),
            total,
            per_agent,
            ui_url,
            max_pending_per_user=100 if per_user is None else per_user,
            max_pending_per_rule=per_rule or 0,
        )

    def webhook(self, value: Any, path: str) -> Webhook | None:
        section = self.doc.mapping(value, path, ("url", "secret_file"))
        url = self.doc.get(section, path, "url", str, required=True)
        if url is None:
            return None
        self.doc.check(
            urlsplit(url).scheme in ("http", "https"), f"{path}.url", "must be an http(s) URL"
        )
        return Webhook(url, self.secret(section, path, "secret_file", required=False))

    def audit(self, value: Any, *, store_redis: dict[str, Any] | None) -> AuditConfig:
        doc = self.doc
        path = "$.audit"
        keys = (
            "file",
            "stdout",
            "redis_stream",
            "hmac_key_file",
            "signing_key_file",
            "checkpoint_every",
            "redact",
            "required",
            "max_file_bytes",
            "rotate_every",
        )
        section = doc.mapping(value, path, keys)
        if not section:
            return AuditConfig()
        file = doc.get(section, path, "file", str)
        file_path = self.path(file) if file else None
        if file_path is not None and not file_path.parent.is_dir():
            doc.error(f"{path}.file", f"directory {str(file_path.parent)!r} does not exist")
        stream = doc.get(section, path, "redis_stream", str)
        if stream is not None and store_redis is None:
            doc.error(f"{path}.redis_stream", "needs store.redis (the stream lives in that Redis)")
        elif stream is not None and not store_redis.get("url"):  # type: ignore[union-attr]
            doc.error(
                f"{path}.redis_stream",
                "needs store.redis.url: the stream is written to a single Redis, not through "
                "Sentinel or Cluster",
            )
        every = doc.get(section, path, "checkpoint_every", int, 1000) or 1000
        doc.check(every > 0, f"{path}.checkpoint_every", "must be more than 0")
        size = doc.get(section, path, "max_file_bytes", int, 100 * 2**20) or 100 * 2**20
        doc.check(size >= 4096, f"{path}.max_file_bytes", "must be at least 4096")
        rotate = (
            doc.duration(section, path, "rotate_every", 0.0) if "rotate_every" in section else None
        )
        redact = doc.strings(section, path, "redact")
        for field_path in redact:
            doc.check(
                bool(_FIELD_PATH.fullmatch(field_path)),
                f"{path}.redact",
                f"{field_path!r}: write a dotted path such as args.ssn or principal.claims.email",
            )
        config = AuditConfig(
            file=file_path,
            stdout=bool(doc.get(section, path, "stdout", bool, False)),
            redis_stream=stream,
            hmac_key=self.secret(section, path, "hmac_key_file", required=False),
            signing_key_file=self.existing_file(section, path, "signing_key_file"),
            checkpoint_every=every,
            redact=redact,
            required=bool(doc.get(section, path, "required", bool, False)),
            max_file_bytes=size,
            rotate_every=rotate or None,
        )
        if config.required and not config.enabled:
            doc.error(
                f"{path}.required", "required: true needs a sink (file, stdout or redis_stream)"
            )
        return config

    def context_token(self, value: Any) -> ContextToken:
        doc = self.doc
        path = "$.context_token"
        section = doc.mapping(value, path, ("signing_key_file", "ttl", "audience"))
        ttl = doc.duration(section, path, "ttl", 60.0)
        doc.check(1 <= ttl <= 3600, f"{path}.ttl", "must be between 1s and 1h")
        return ContextToken(
            signing_key_file=self.existing_file(section, path, "signing_key_file"),
            ttl=ttl,
            audience=doc.get(section, path, "audience", str, "tools") or "tools",
        )


def parse_host_port(text: str) -> HostPort | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - listening on all interfaces is the sidecar default
    return HostPort(host, int(port))


_FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)+")


_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@]+")


def _origin_problem(origin: str) -> str | None:
    """Why `origin` is not one a browser would send, or None."""
    if origin == "*":
        return (
            '"*" is not allowed: list the origins of the browser clients (e.g. '
            '"http://localhost:6274" for the MCP Inspector)'
        )
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        lowered = origin.lower().rstrip("/")
        hint = f" (write {lowered!r})" if lowered != origin and _ORIGIN.fullmatch(lowered) else ""
        return (
            f'must be an origin "scheme://host[:port]" as browsers send it: http or https, '
            f"lower case, no path or trailing slash, not {origin!r}{hint}"
        )
    port = match["port"]
    if port is not None and (int(port) > 65535 or port == _DEFAULT_PORTS[match["scheme"]]):
        if int(port) > 65535:
            return f"port {port} is out of range"
        shorter = f"{match['scheme']}://{match['host']}"
        return f"browsers send the default port as no port: write {shorter!r}"
    return None


def _is_plain_path(path: str) -> bool:
    """A path the HTTP adapter leaves as it is: RFC 3986 segment characters only, no escapes,
    no dot or empty segments."""
    segments = path.split("/")[1:]
    return path == "/" or all(
        _PLAIN_SEGMENT.fullmatch(seg) and seg not in (".", "..") for seg in segments
    )


def _claim_path_readable(path: str) -> bool:
    """A claim name, or a dotted path whose every step is a name (no empty step, no index:
    `roles[0]` and `a..b` read nothing). A URL-like namespaced name is read whole."""
    if "://" in path:
        return bool(path.strip()) and not any(c.isspace() for c in path)
    steps = path.split(".")
    return all(step and not any(c in "[] \t" for c in step) for step in steps)


def _valid_url(url: str, grpc: bool) -> bool:
    """gRPC upstreams are addressed by host and port only: the method is the path."""
    parts = urlsplit(url)
    if not parts.hostname or parts.query or parts.fragment or parts.username:
        return False
    if grpc:
        return parts.scheme in ("grpc", "grpcs", "http", "https") and parts.path in ("", "/")
    return parts.scheme in ("http", "https")


def _token_url_ok(url: str) -> bool:
    parts = urlsplit(url)
    if not parts.hostname or parts.fragment or parts.username:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_FIXED_LABELS = frozenset(
    {"agent", "upstream", "action", "model", "currency", "type", "decision", "rule"}
)


def _check_node(doc: Document, path: str, node: str) -> None:
    host, sep, port = node.rpartition(":")
    doc.check(
        bool(sep and host and port.isdigit() and 0 < int(port) < 65536),
        path,
        f'must be "host:port", not {node!r}',
    )


def _check_sts(sts: StsSettings, config: Config, doc: Document, issues: list[Issue]) -> None:
    """What the STS needs of the rest of the config: a key every replica shares, an issuer
    name of its own, and delegations that name upstreams that exist."""
    if config.store.redis is not None and sts.signing_key_file is None:
        doc.error(
            "$.sts.signing_key_file",
            "a fleet (store.redis) must share one STS key: set signing_key_file (agentproxy keys"
            " generate DIR writes one), or tokens issued by one replica fail on another",
        )
    if any(i.issuer == sts.issuer for i in config.identity.issuers):
        doc.error(
            "$.sts.issuer",
            f"{sts.issuer!r} is also in identity.issuers: the proxy trusts its own STS issuer"
            " by itself; remove that entry (or name the STS differently)",
        )
    names = {u.name for u in config.upstreams}
    for rule in sts.delegations:
        pos = rule.position
        for audience in rule.audiences:
            if audience not in names:
                issues.append(
                    Issue(
                        pos.file,
                        pos.line,
                        pos.column,
                        f"delegation {rule.id}.audiences",
                        f"{audience!r} is not an upstream (known: {', '.join(sorted(names))})",
                    )
                )


def _redis_section(raw: dict[str, Any]) -> dict[str, Any] | None:
    store = raw.get("store")
    section = store.get("redis") if isinstance(store, dict) else None
    return section if isinstance(section, dict) else None
