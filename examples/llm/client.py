"""The LLM example's agent: the official OpenAI and Anthropic SDKs, through agentproxy. The
SDK's api_key is the agent's token (the proxy's credential); the provider's own key stays
with the proxy.

python examples/llm/client.py TOKEN [--base http://127.0.0.1:8083]
"""

from __future__ import annotations

import argparse
import sys

import anthropic
import openai


def run(base: str, token: str) -> list[str]:
    lines = []
    oai = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
    reply = oai.chat.completions.create(
        model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    lines.append(f"openai: {reply.choices[0].message.content}")
    try:
        oai.chat.completions.create(
            model="gpt-4o-mini",
            max_completion_tokens=5000,
            messages=[{"role": "user", "content": "hi"}],
        )
        lines.append("openai, 5000 tokens: allowed?!")
    except openai.PermissionDeniedError as exc:
        lines.append(f"openai, 5000 tokens: refused: {exc.body['message']}")  # type: ignore[index]
    claude = anthropic.Anthropic(
        base_url=base,
        api_key="unused",
        max_retries=0,
        default_headers={"Authorization": f"Bearer {token}"},
    )
    message = claude.messages.create(
        model="claude-sonnet", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    lines.append(f"anthropic: {message.content[0].text}")  # type: ignore[union-attr]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("token")
    parser.add_argument("--base", default="http://127.0.0.1:8083")
    args = parser.parse_args()
    for line in run(args.base, args.token):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
