"""A runtime snapshot: config, compiled policy, keys and routes, built whole or not at all.

A call takes the snapshot current when it starts and keeps it to the end, so a reload never
changes the rules under a call in flight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import orjson

from agentproxy.config import Config, ConfigError, Issue, load
from agentproxy.config.model import (
    OpenApiOperation,
    PrincipalRef,
    RuleSpec,
    StsSettings,
    Upstream,
    metadata_url,
)
from agentproxy.core import Action, Effect
from agentproxy.errors import NoRoute
from agentproxy.identity.context import ContextSigner
from agentproxy.identity.sts import DelegationPolicy, StsSigner, compile_condition
from agentproxy.identity.verifier import TokenVerifier
from agentproxy.metering.meter import compile_attribution
from agentproxy.policy import PolicySet, compile_policy, policy_issues
from agentproxy.policy.compiler import without_strings
from agentproxy.policy.patterns import ActionPattern, compile_pattern
from agentproxy.protocols import grpc_reflection, http, mcp
from agentproxy.protocols.grpc import DescriptorError, Method, load_descriptor_set
from agentproxy.protocols.openapi import BodyValidator, check_path_params

# A remembered request line costs its Action and its strings: 4,096 lines of at most 512
# characters bound the memory to a few MiB, whatever agents send.
LINES = 4096
LINE_BYTES = 512


@dataclass(frozen=True, slots=True)
class Operation:
    """An upstream's OpenAPI operation, compiled: its action pattern, and its body schema."""

    pattern: ActionPattern
    spec: OpenApiOperation
    validator: BodyValidator | None


def compile_operations(upstream: Upstream) -> tuple[Operation, ...]:
    """The upstream's operations, concrete paths before templated ones (OpenAPI: `/users/me`
    is matched before `/users/{id}`)."""
    ordered = sorted(upstream.openapi, key=lambda op: (op.path.count("{"), -len(op.path)))
    return tuple(
        Operation(
            compile_pattern(op.action),
            op,
            BodyValidator(op) if op.body_schema is not None else None,
        )
        for op in ordered
    )


@dataclass(frozen=True, slots=True)
class Sts:
    """The STS of a snapshot: its signer (whose key outlives reloads) and its rules."""

    signer: StsSigner
    delegations: DelegationPolicy


@dataclass(frozen=True, slots=True)
class Challenge:
    """What a refusal's `WWW-Authenticate` names for an upstream (RFC 9728 §5.1): where its
    protected resource metadata is, and the scopes every scoped rule there needs (a 401's
    `scope`: what a client asks for first). Empty for upstreams that publish none."""

    metadata_url: str | None = None
    scopes: tuple[str, ...] = ()


NO_CHALLENGE: Final = Challenge()


METADATA_PATH: Final = "/.well-known/oauth-protected-resource"


def protected_resources(
    upstreams: tuple[Upstream, ...], policy: PolicySet
) -> tuple[dict[str, Challenge], dict[str, bytes]]:
    """By upstream name, the challenge of each upstream with `authorization`; and by the
    data plane path each metadata document is served at (the RFC 9728 §3.1 path of its
    resource, and the bare well-known path when only one upstream publishes one). Raises
    ValueError when two resources would be served at one path (the data plane serves them
    by path: `https://a/mcp` and `https://b/mcp` are one path)."""
    by_name: dict[str, Challenge] = {}
    by_path: dict[str, bytes] = {}
    for upstream in upstreams:
        auth = upstream.authorization
        if auth is None or not upstream.audiences:
            continue
        resource = upstream.audiences[0]
        # What every scoped rule here needs: the least a client should ask for at first
        # (the body is not read before a token verifies, so the call is not known yet);
        # more comes by step-up, an insufficient_scope naming a rule's whole set.
        scoped = [
            rule.scopes
            for rule in policy.rules
            if rule.scopes and (not rule.upstreams or upstream.name in rule.upstreams)
        ]
        scopes = sorted(frozenset.intersection(*scoped)) if scoped else []
        url = metadata_url(resource)
        document = orjson.dumps(auth.metadata(resource))
        path = urlsplit(url).path
        if path in by_path:
            raise ValueError(
                f"upstream {upstream.name}'s resource {resource} has its metadata at {path},"
                " as another upstream's does: give the resources different paths"
            )
        by_name[upstream.name] = Challenge(url, tuple(scopes))
        by_path[path] = document
    if len(by_path) == 1:
        by_path.setdefault(METADATA_PATH, next(iter(by_path.values())))
    return by_name, by_path


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    policy: PolicySet
    verifier: TokenVerifier
    signer: ContextSigner
    routes: tuple[Upstream, ...]
    # gRPC upstreams by the service they serve ("" for the default), and the methods their
    # descriptor sets describe (by upstream name; reflection-fetched ones are added later).
    grpc_routes: Mapping[str, Upstream] = field(default_factory=dict)
    grpc_methods: Mapping[str, Mapping[str, Method]] = field(default_factory=dict)
    # Request lines described and routed lately (see `describe_http`); read and written on
    # the event loop only.
    _lines: dict[tuple[str, str], tuple[Action, str, Upstream]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # OpenAPI operations by upstream name, and those found lately by action name.
    operations: Mapping[str, tuple[Operation, ...]] = field(default_factory=dict)
    _operations_found: dict[tuple[str, str], tuple[Operation, Mapping[str, str]] | None] = field(
        default_factory=dict, repr=False, compare=False
    )
    # The token exchange endpoint's key and delegation rules (`sts:`), if configured.
    sts: Sts | None = None
    # Upstreams that publish protected resource metadata, by name; the documents by path.
    challenges: Mapping[str, Challenge] = field(default_factory=dict)
    metadata_documents: Mapping[str, bytes] = field(default_factory=dict)

    def challenge(self, upstream: Upstream | None) -> Challenge:
        """What a refusal of a call to `upstream` names in `WWW-Authenticate`."""
        if upstream is None or not self.challenges:
            return NO_CHALLENGE
        return self.challenges.get(upstream.name, NO_CHALLENGE)

    def operation(self, action: Action) -> tuple[Operation, Mapping[str, str]] | None:
        """The OpenAPI operation an HTTP action calls on its upstream, with its bindings."""
        ops = self.operations.get(action.upstream)
        if not ops:
            return None
        key = (action.upstream, action.name)
        if key in self._operations_found:
            return self._operations_found[key]
        found = None
        for op in ops:
            bindings = op.pattern.match(action.name, action.fold_case)
            if bindings is not None:
                found = (op, bindings)
                break
        if len(self._operations_found) >= LINES:
            self._operations_found.clear()
        self._operations_found[key] = found
        return found

    @property
    def audit_reads_args(self) -> bool:
        """Whether the audit trail redacts an `args.` path: then a JSON or form body is read
        as `args` whatever the policy reads, so that the trail records it (redacted)."""
        audit = self.config.audit
        return audit.enabled and any(path.startswith("args.") for path in audit.redact)

    def describe_http(self, method: str, raw_target: str) -> tuple[Action, str, Upstream]:
        """The HTTP adapter's action for a request line, bound to the upstream it routes to,
        its raw query, and that upstream. Agents send the same few lines over and over:
        short ones are remembered (up to LINES, then forgotten all at once), so the common
        call builds nothing. Raises BadRequest (the adapter refuses the line) or NoRoute."""
        key = (method, raw_target)
        found = self._lines.get(key)
        if found is not None:
            return found
        action, raw_query = http.describe(method, raw_target)
        upstream = self.route(action.target)
        action = http.read_as_upstream(
            replace(action, upstream=upstream.name),
            fold_case=upstream.path_case == "insensitive",
            canonical_integers=upstream.integer_segments == "canonical",
            ignore_trailing_slash=upstream.trailing_slash == "ignored",
        )
        if upstream.openapi:
            operation = self.operation(action)
            if operation is not None:
                check_path_params(operation[0].spec, operation[1])
        found = (action, raw_query, upstream)
        if len(method) + len(raw_target) <= LINE_BYTES:
            if len(self._lines) >= LINES:
                self._lines.clear()
            self._lines[key] = found
        return found

    def route(self, path: str) -> Upstream:
        """The HTTP upstream with the longest `path_prefix` that contains `path`, else the
        default. A prefix matches whole segments only: `/v1` serves `/v1` and `/v1/x`, never
        `/v10`. Raises NoRoute when nothing matches.
        """
        for upstream in self.routes:
            prefix = upstream.path_prefix
            if prefix is None or prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return upstream
        raise NoRoute(f"no upstream is configured for {path}")

    def route_grpc(self, service: str) -> Upstream:
        """The gRPC upstream serving `service`, else the default one. Raises NoRoute."""
        upstream = self.grpc_routes.get(service) or self.grpc_routes.get("")
        if upstream is None:
            raise NoRoute(f"no gRPC upstream is configured for service {service}")
        return upstream


def builtin_rules() -> tuple[RuleSpec, ...]:
    """The MCP baseline (session housekeeping and discovery: initialize, ping, notifications,
    listings) and gRPC server reflection, for every authenticated agent unless a policy
    denies them."""
    return (
        RuleSpec(
            id="mcp-baseline",
            agents=("*",),
            users=(),
            actions=mcp.BASELINE_ACTIONS,
            effect=Effect.ALLOW,
            reason="MCP session housekeeping and discovery (built in)",
            builtin=True,
        ),
        RuleSpec(
            id="grpc-reflection",
            agents=("*",),
            users=(),
            # Answered only with the services and methods the caller could be allowed to
            # call (proxy/grpc_reflection.py): the gRPC twin of the MCP listings.
            actions=tuple(
                f"grpc:/{service}/ServerReflectionInfo"
                for service in sorted(grpc_reflection.REFLECTION_SERVICES)
            ),
            effect=Effect.ALLOW,
            reason="gRPC server reflection, filtered to what the caller may call (built in)",
            builtin=True,
        ),
    )


def load_config(path: str | Path) -> Config:
    """The one loader `validate`, start and reload use: config, policy files and their CEL.

    Raises ConfigError with every problem in every file.
    """
    return load(path, check_policies=policy_issues)


def check(config: Config) -> PolicySet:
    """Everything `validate` checks beyond the loader: policy compiles, key files load.

    Raises ConfigError with every problem found.
    """
    issues: list[Issue] = []
    policy = None
    try:
        policy = compile_policy(config.policy_files, builtin_rules())
    except ConfigError as exc:
        issues.extend(exc.issues)
    try:
        compile_attribution(config.metering)
    except ValueError as exc:
        issues.append(Issue(str(config.source), 1, 1, "$.metering.attribution", str(exc)))
    try:
        ContextSigner.load(config.context_token)
    except ValueError as exc:
        issues.append(Issue(str(config.source), 1, 1, "$.context_token.signing_key_file", str(exc)))
    if config.sts is not None:
        issues.extend(delegation_issues(config.sts))
        try:
            StsSigner.load(config.sts)
        except ValueError as exc:
            issues.append(Issue(str(config.source), 1, 1, "$.sts.signing_key_file", str(exc)))
    issues.extend(unbound_privileges(config, policy))
    issues.extend(unknown_upstreams(config, policy))
    issues.extend(silent_denials(config, policy))
    issues.extend(llm_spend_currencies(config, policy))
    if policy is not None:
        try:
            protected_resources(config.upstreams, policy)
        except ValueError as exc:
            issues.append(Issue(str(config.source), 1, 1, "$.upstreams", str(exc)))
    for i, upstream in enumerate(config.upstreams):
        try:
            descriptor_methods(upstream)
        except DescriptorError as exc:
            where = f"$.upstreams[{i}].descriptor_set"
            issues.append(Issue(str(config.source), 1, 1, where, str(exc)))
    if issues or policy is None:
        raise ConfigError(issues)
    return policy


def unknown_upstreams(config: Config, policy: PolicySet | None) -> list[Issue]:
    """A rule scoped to an upstream no config names would silently never match."""
    names = {u.name for u in config.upstreams}
    issues = []
    for rule in policy.rules if policy is not None else ():
        for name in sorted(rule.upstreams - names):
            pos = rule.position
            known = ", ".join(sorted(names))
            issues.append(
                Issue(
                    pos.file,
                    pos.line,
                    pos.column,
                    f"rule {rule.id}.upstreams",
                    f"no upstream is named {name!r} (the config names {known})",
                )
            )
    return issues


_RESOURCE_MEMBER = re.compile(r"(?<![.\w])resource\s*\.\s*([A-Za-z_]\w*)")


def silent_denials(config: Config, policy: PolicySet | None) -> list[Issue]:
    """Conditions that would deny every call they see, for a reason the config shows: `args`
    read on HTTP calls whose body is never read (`body: stream`, a GET), `resource.NAME` on
    a pattern that binds no NAME."""
    issues: list[Issue] = []
    http_upstreams = [u for u in config.upstreams if u.protocol == "http"]
    for rule in policy.rules if policy is not None else ():
        if rule.builtin:
            continue
        pos = rule.position
        sources = [rule.when or "", rule.cost.expr if rule.cost and rule.cost.expr else ""]
        sources += [limit.key for limit in rule.limits if limit.key_expr is not None]
        text = without_strings(" ".join(sources))
        for name in sorted(set(_RESOURCE_MEMBER.findall(text)) - {"query"}):
            if re.search(rf"has\(\s*resource\s*\.\s*{name}\s*\)", text):
                continue  # guarded: written for patterns that bind it and ones that do not
            for pattern in rule.patterns:
                if name in pattern.names:
                    continue
                bound = ", ".join(pattern.names) or "nothing"
                issues.append(
                    Issue(
                        pos.file,
                        pos.line,
                        pos.column,
                        f"rule {rule.id}.when",
                        f"resource.{name}: action {pattern.text!r} binds {bound}, so the "
                        f"condition could never read it (name it {{{name}}} in the path)",
                    )
                )
        if not rule.reads_args:
            continue
        http_patterns = [p.text for p in rule.patterns if p.text.startswith("http:")]
        bodyless = [t for t in http_patterns if t.split(" ")[0] in ("http:GET", "http:HEAD")]
        for text in bodyless:
            issues.append(
                Issue(
                    pos.file,
                    pos.line,
                    pos.column,
                    f"rule {rule.id}.when",
                    f"reads args, but {text!r} calls carry no body, so args is empty "
                    "(read the query string as resource.query)",
                )
            )
        scoped = [u for u in http_upstreams if not rule.upstreams or u.name in rule.upstreams]
        if http_patterns and scoped and all(u.body == "stream" for u in scoped):
            names = ", ".join(u.name for u in scoped)
            issues.append(
                Issue(
                    pos.file,
                    pos.line,
                    pos.column,
                    f"rule {rule.id}.when",
                    f"reads args on HTTP calls, but upstream {names} never reads bodies "
                    "(body: stream), so args is always empty: set body: auto",
                )
            )
    return issues


def llm_spend_currencies(config: Config, policy: PolicySet | None) -> list[Issue]:
    """A spend limit of an LLM rule without a cost is charged in the price table's currency:
    one in another would never be compared with what calls cost."""
    issues = []
    currency = config.metering.currency
    for rule in policy.rules if policy is not None else ():
        if rule.cost is not None:
            continue
        for limit in rule.limits:
            if limit.spend is not None and limit.currency not in (None, currency):
                pos = rule.position
                issues.append(
                    Issue(
                        pos.file,
                        pos.line,
                        pos.column,
                        f"rule {rule.id}.limits",
                        f"limit {limit.name!r} is in {limit.currency}, but LLM calls are "
                        f"priced in {currency} (metering.currency)",
                    )
                )
    return issues


def unbound_privileges(config: Config, policy: PolicySet | None) -> list[Issue]:
    """With more than one trusted issuer, an operator or approver entry must name its issuer:
    otherwise a token from any of them with the same subject (a partner IdP's `ops-admin`)
    would be that operator or approver."""
    if len(config.identity.issuers) < 2:
        return []
    hint = "bind it to its issuer (ENTRY@ISSUER), since more than one issuer is trusted"
    issues = [
        Issue(str(config.source), 1, 1, f"$.admin.operators[{i}]", f"{entry!r}: {hint}")
        for i, entry in enumerate(config.admin.operators)
        if PrincipalRef.parse(entry).issuer is None
    ]
    for rule in policy.rules if policy is not None else ():
        if rule.approval is None:
            continue
        for entry in rule.approval.approvers:
            if PrincipalRef.parse(entry).issuer is None:
                pos = rule.position
                where = f"rule {rule.id}.approval.approvers"
                issues.append(Issue(pos.file, pos.line, pos.column, where, f"{entry!r}: {hint}"))
    return issues


def delegation_issues(settings: StsSettings) -> list[Issue]:
    """Each delegation condition that does not compile, at its rule."""
    issues = []
    for spec in settings.delegations:
        if spec.when is None:
            continue
        try:
            compile_condition(spec.when)
        except ValueError as exc:
            pos = spec.position
            issues.append(
                Issue(pos.file, pos.line, pos.column, f"delegation {spec.id}.when", str(exc))
            )
    return issues


def descriptor_methods(upstream: Upstream) -> dict[str, Method] | None:
    """The methods of the upstream's descriptor set file, if it has one.
    Raises DescriptorError."""
    if upstream.descriptor_set is None:
        return None
    try:
        data = upstream.descriptor_set.read_bytes()
    except OSError as exc:
        raise DescriptorError(f"cannot read {upstream.descriptor_set}: {exc}") from None
    return load_descriptor_set(data)


async def build(config: Config) -> Runtime:
    """Compiles policy, loads keys (fetching JWKS URLs) and orders routes.

    Raises ConfigError for problems in the files, Unavailable if a JWKS URL cannot be fetched.
    """
    policy = check(config)
    sts = None
    if config.sts is not None:
        try:
            sts = Sts(StsSigner.load(config.sts), DelegationPolicy(config.sts, config.upstreams))
        except ValueError as exc:
            raise ConfigError([Issue(str(config.source), 1, 1, "$.sts", str(exc))]) from None
    verifier = TokenVerifier(
        config.identity,
        own=(sts.signer.trusted_issuer(config.upstreams), sts.signer.public_key) if sts else None,
        resources=tuple(dict.fromkeys(a for u in config.upstreams for a in u.audiences)),
    )
    try:
        await verifier.start()
    except ValueError as exc:
        raise ConfigError(
            [Issue(str(config.source), 1, 1, "$.identity.issuers", str(exc))]
        ) from None
    signer = ContextSigner.load(config.context_token)
    routes = sorted(
        (u for u in config.upstreams if not u.is_grpc),
        key=lambda u: (u.path_prefix is None, -len(u.path_prefix or "")),
    )
    grpc_routes = {u.service or "": u for u in config.upstreams if u.is_grpc}
    methods: dict[str, Mapping[str, Method]] = {}
    for upstream in grpc_routes.values():
        found = descriptor_methods(upstream)
        if found is not None:
            methods[upstream.name] = found
    operations = {u.name: compile_operations(u) for u in config.upstreams if u.openapi}
    try:
        challenges, documents = protected_resources(config.upstreams, policy)
    except ValueError as exc:
        raise ConfigError([Issue(str(config.source), 1, 1, "$.upstreams", str(exc))]) from None
    return Runtime(
        config,
        policy,
        verifier,
        signer,
        tuple(routes),
        grpc_routes,
        methods,
        operations=operations,
        sts=sts,
        challenges=challenges,
        metadata_documents=documents,
    )
