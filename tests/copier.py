"""A chat host that follows the copy instruction perfectly (continuation by instruction's oracle).

It stands in front of this project's model server (real HTTP on both sides). A request whose
system message carries :data:`~blackbox_proxy.decoding.instructed.COPY_INSTRUCTION` is answered
as if the host had copied the answer so far and gone on: the answer so far's own tokens (logprob
0), then the model server's real continuation of it (``continue_final_message``), logprobs and
usage included. Every other request is passed through. So the positions after the copy are
exactly what a continuing host gives, and a chat-only generation against it must equal the same
generation in ``chat-prefix`` mode.

``fail_first``: the first N copy requests answer with a wrong first token instead (a host that
does not copy), to exercise the decoder's fallbacks.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from blackbox_proxy.decoding.instructed import COPY_INSTRUCTION, COPY_SLACK
from blackbox_proxy.tokens.loaders import hf_token_bytes


def copier_app(upstream: str, tokenizer: Any, *, fail_first: int = 0, fail_sampled: bool = False) -> FastAPI:
    app = FastAPI()
    token_bytes, _ = hf_token_bytes(tokenizer)
    state = {"copies": 0, "failed": 0}
    app.state.counts = state

    @app.get("/v1/models")
    def models() -> Any:
        return httpx.get(f"{upstream}/models").json()

    @app.post("/v1/chat/completions")
    async def chat(http: Request) -> Any:
        body = await http.json()
        messages = body["messages"]
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        if COPY_INSTRUCTION not in system:
            return JSONResponse(httpx.post(f"{upstream}/chat/completions", json=body, timeout=60).json())
        state["copies"] += 1
        head, partial = system.split(COPY_INSTRUCTION, 1)
        rest = messages[1:]
        if head.strip():
            rest = [{"role": "system", "content": head.rstrip("\n")}, *rest]
        sampled = body.get("temperature", 1) != 0
        if state["failed"] < fail_first and (fail_sampled or not sampled):
            state["failed"] += 1
            partial = "\u00a7" + partial  # a wrong first byte: not a copy
            upstream_body = dict(body, messages=rest)
        else:
            upstream_body = dict(body, messages=[*rest, {"role": "assistant", "content": partial}],
                                 continue_final_message=True, add_generation_prompt=False)
        ids = tokenizer.encode(partial, add_special_tokens=False)
        # the copy's tokens count in max_tokens, with the slack the client leaves for a copy
        # tokenised otherwise (so it drafts what a continuing host is asked for)
        upstream_body["max_tokens"] = max(1, body["max_tokens"] - len(ids) - COPY_SLACK)
        answer = httpx.post(f"{upstream}/chat/completions", json=upstream_body, timeout=60).json()
        if "choices" not in answer:
            return JSONResponse(answer, status_code=400)
        copy = []
        for token_id in ids:
            data = token_bytes[token_id]
            entry = {"token": data.decode(errors="replace"), "logprob": 0.0, "bytes": list(data)}
            copy.append(dict(entry, top_logprobs=[entry]))
        for choice in answer["choices"]:
            choice["message"]["content"] = partial + (choice["message"]["content"] or "")
            choice["logprobs"]["content"] = copy + choice["logprobs"]["content"]
        answer["usage"]["completion_tokens"] += len(ids) * len(answer["choices"])
        return JSONResponse(answer)

    return app
