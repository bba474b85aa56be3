"""A stand-in LLM provider for the example, speaking OpenAI's chat completions and
Anthropic's messages (answers and usage only). For a real one, point the upstream at
https://api.openai.com or https://api.anthropic.com with its key file (see agentproxy.yaml).

python examples/llm/provider.py [--port 8200]
"""

from __future__ import annotations

import argparse
import sys

from aiohttp import web


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {
            "id": "chatcmpl-example",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hello from the stand-in"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
        }
    )


async def messages(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response(
        {
            "id": "msg_example",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": "hello from the stand-in"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 12, "output_tokens": 6},
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/messages", messages)
    print(f"stand-in LLM provider on http://127.0.0.1:{args.port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
