"""Identity: verify the caller's bearer token and sign the context forwarded upstream."""

from agentproxy.identity.context import ContextSigner
from agentproxy.identity.issue import generate_demo_keypair, mint_token
from agentproxy.identity.principal import principal_from_claims
from agentproxy.identity.verifier import TokenVerifier

__all__ = [
    "ContextSigner",
    "TokenVerifier",
    "generate_demo_keypair",
    "mint_token",
    "principal_from_claims",
]
