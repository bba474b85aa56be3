"""The Dockerfile's invariants, read from its text (no Docker engine builds it here).

Multi-stage on a slim Python, a numeric non-root USER, the exact ENTRYPOINT and CMD, a
HEALTHCHECK on the admin port, no compilers in the final image, and nothing secret sent to the
build: no COPY of keys, secrets, the venv or the tests, and a .dockerignore that keeps them out
of the build context even if a later COPY widens.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
FORBIDDEN_SOURCES = (".pem", ".key", "keys", "secret", ".venv", "tests", ".git")
COMPILERS = ("gcc", "g++", "clang", "build-essential", "make", "cc", "rustc", "cargo")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def instructions(text: str) -> list[Instruction]:
    """Dockerfile lines joined across `\\` continuations, comments and blanks dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, arguments = full.partition(" ")
        out.append(Instruction(keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the build stages with `${ARG}` bases resolved."""
    args: dict[str, str] = {}
    found: list[Stage] = []
    for instruction in instructions(text):
        if instruction.keyword == "ARG" and not found:
            arg, _, default = instruction.arguments.partition("=")
            args[arg] = default
        elif instruction.keyword == "FROM":
            words = [w for w in instruction.arguments.split() if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(base, name))
        else:
            assert found, f"{instruction.keyword} before the first FROM"
            found[-1].instructions.append(instruction)
    return args, found


@pytest.fixture(scope="module")
def build() -> list[Stage]:
    return stages(DOCKERFILE.read_text(encoding="utf-8"))[1]


@pytest.fixture(scope="module")
def final(build: list[Stage]) -> Stage:
    return build[-1]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def test_multi_stage_on_slim_python(build: list[Stage], final: Stage) -> None:
    assert len(build) >= 2
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", final.base)
    assert final.name is None or final.name != build[0].name


def test_final_stage_copies_only_the_venv_from_the_builder(
    build: list[Stage], final: Stage
) -> None:
    copies = final.all("COPY") + final.all("ADD")
    assert copies == [f"--from={build[0].name} /opt/agentproxy /opt/agentproxy"]


def test_no_copy_of_keys_secrets_venv_or_tests(build: list[Stage]) -> None:
    for stage in build:
        for arguments in stage.all("COPY") + stage.all("ADD"):
            sources = [w for w in arguments.split() if not w.startswith("--")][:-1]
            for source in sources:
                for forbidden in FORBIDDEN_SOURCES:
                    assert forbidden not in source.lower(), f"COPY {arguments}"
                assert source not in (".", "./", "*"), f"COPY {arguments}: the whole context"


def test_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    users = final.all("USER")
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert user == "10001"  # the chart's securityContext.runAsUser
    last_run = max(
        (i for i, ins in enumerate(final.instructions) if ins.keyword == "RUN"), default=-1
    )
    first_user = next(i for i, ins in enumerate(final.instructions) if ins.keyword == "USER")
    assert last_run < first_user, "RUN after USER: the image is not built as root throughout"


def test_entrypoint_and_cmd(final: Stage) -> None:
    assert [exec_form(a) for a in final.all("ENTRYPOINT")] == [["agentproxy"]]
    assert [exec_form(a) for a in final.all("CMD")] == [
        ["run", "--config", "/etc/agentproxy/agentproxy.yaml"]
    ]


def test_healthcheck_hits_healthz_with_python(final: Stage) -> None:
    [check] = final.all("HEALTHCHECK")
    command = check.partition("CMD ")[2]
    argv = exec_form(command)
    assert argv[0] == "python"
    assert "urllib.request" in argv[-1]
    assert "http://127.0.0.1:9901/healthz" in argv[-1]


def test_read_only_root_friendly(final: Stage) -> None:
    env = " ".join(final.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    volumes = [v for arguments in final.all("VOLUME") for v in json.loads(arguments)]
    assert "/var/log/agentproxy" in volumes
    exposed = sorted(int(port) for arguments in final.all("EXPOSE") for port in arguments.split())
    assert exposed == [8080, 9901, 9902, 50051]


def test_no_compilers_in_the_final_stage(build: list[Stage], final: Stage) -> None:
    words = set(re.findall(r"[\w+.-]+", " ".join(final.all("RUN")).lower()))
    assert not words & set(COMPILERS), sorted(words & set(COMPILERS))
    assert "apt-get" not in words  # nothing installed at all: the venv is the whole addition
    builder_runs = " ".join(build[0].all("RUN"))
    assert "pip wheel" in builder_runs and "/opt/agentproxy" in builder_runs


def ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a match on a
    directory excludes everything under it."""
    result = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.removeprefix("!").strip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatchcase(prefix, body) or (
                body.startswith("**/")
                and any(fnmatch.fnmatchcase("/".join(parts[j:i]), body[3:]) for j in range(i))
            ):
                result = not negate
                break
    return result


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/config",
        "examples/demo/.keys/issuer.pem",
        "tests/conftest.py",
        "bench/http_overhead.py",
        "issuer.pem",
        "deploy/keys/context.pem",
        "secrets/hr-api-key",
        "examples/secrets/token",
        ".cache/helm/bin/helm",
    ],
)
def test_dockerignore_keeps_secrets_out_of_the_context(path: str) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignored(patterns, path), f"{path} would be sent to the Docker daemon"


@pytest.mark.parametrize(
    "path",
    [
        "pyproject.toml",
        "setup.py",
        "MANIFEST.in",
        "README.md",
        "proto/generate.py",
        "proto/agentproxy/v1/authorizer.proto",
        "src/agentproxy/cli.py",
    ],
)
def test_dockerignore_keeps_what_the_build_needs(path: str) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not ignored(patterns, path)
