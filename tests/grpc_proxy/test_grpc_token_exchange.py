"""A gRPC upstream with `credentials.token_exchange`: each call's metadata carries a token
the upstream's authorization server (oidc-provider) issued for that caller, and never the
caller's own token or a credential it chose."""

from __future__ import annotations

from pathlib import Path

import grpc
import jwt
import pytest

from agentproxy.proxy.runtime import load_config
from agentproxy.proxy.server import ProxyServer
from tests.conftest import Generated, Keys, Upstream
from tests.grpc_proxy.conftest import GrpcUpstream, bearer, grpc_config
from tests.harness.oidc import EXCHANGE, Client, run_provider

ENTRY = "https://agentproxy.test"
HR = "https://hr-grpc.test"
AGENT = Client("hr-bot", "bot-secret", scope="hr:read")
PROXY = Client("agentproxy", "proxy-secret", grant_types=(EXCHANGE,), scope="hr:read")


async def test_grpc_calls_carry_a_token_issued_for_their_caller(
    tmp_path: Path,
    keys: Keys,
    upstream: Upstream,
    grpc_upstream: GrpcUpstream,
    hr: Generated,
) -> None:
    resources = {ENTRY: {"scope": "hr:read"}, HR: {"scope": "hr:read"}}
    async with run_provider(tmp_path, [AGENT, PROXY], resources, default_resource=ENTRY) as op:
        d = tmp_path / "proxy"
        d.mkdir()
        path = grpc_config(
            d, keys, upstream.url, grpc_upstream.url, descriptor_set=hr.descriptor_set
        )
        (d / "proxy-secret").write_text(PROXY.client_secret)
        exchange = (
            "    credentials:\n      token_exchange:\n"
            f'        token_url: "{op.token_url}"\n        client_id: agentproxy\n'
            f'        client_secret_file: proxy-secret\n        resource: "{HR}"\n'
            "        header: x-api-key\n"
        )
        text = path.read_text()
        text = text.replace(
            "    credentials: {header: x-api-key, value_file: secret}\n", exchange, 1
        )
        text = text.replace(
            "identity:\n  issuers:\n",
            f'identity:\n  issuers:\n    - issuer: "{op.issuer}"\n      discovery: true\n'
            f'      audiences: ["{ENTRY}"]\n      algorithms: [RS256]\n',
            1,
        )
        path.write_text(text)
        server = ProxyServer(load_config(path), watch_interval=None)
        await server.start()
        try:
            token = await op.client_credentials(AGENT, ENTRY, "hr:read")
            forged = (("x-api-key", "agent-chosen"), ("x_api_key", "agent-chosen"))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                employee = await hr.grpc.EmployeesStub(channel).Get(
                    hr.pb2.GetRequest(id="42"), metadata=(*bearer(token), *forged)
                )
            assert employee.name == "Employee 42"
            seen = grpc_upstream.metadata()
            credential = seen["x-api-key"]
            assert credential != token and "agent-chosen" not in credential
            claims = jwt.decode(credential, options={"verify_signature": False})
            assert (claims["aud"], claims["sub"], claims["act"]) == (
                HR,
                "hr-bot",
                {"sub": "agentproxy"},
            )
            assert "authorization" not in seen and "x_api_key" not in seen
            # The test issuer's agents are not known to the upstream's server: refused there.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await hr.grpc.EmployeesStub(channel).Get(
                        hr.pb2.GetRequest(id="1"), metadata=bearer(keys.token())
                    )
            assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "invalid_grant" in (info.value.details() or "")
            assert len(grpc_upstream.seen) == 1
        finally:
            await server.stop()
