"""The comparison collection page (Bai et al. 2022, §2.2 and §4.5): a person chats with
the assistant; at every turn two responses come back, and the person says which
is better (optionally how much), or "tie" / "both bad". Every label goes into the
comparison store (hh_ray/comparisons.py) before it is acknowledged.

    hh-ray collect --policy runs/online/round-1/policy --policy-b runs/online/round-0/policy \\
        --collect.db runs/online/comparisons.sqlite

Two responses per turn: from two policy snapshots (`policy` and `policy_b`,
one in-process vLLM engine each), or two samples of one snapshot. Which
snapshot is shown as "1" is drawn at random per turn, so position bias
cannot favour a snapshot; the store records which snapshot wrote each.

Each snapshot's engine is stepped by an `EngineLoop` (serve/load.py), and the
page has the assistant's limits: body and generation deadlines (408 / 504), a
bounded queue (503 or 429 with Retry-After), a health check on the engines,
and, with no API key, the Host check against DNS rebinding (421) and the
Origin check against cross-site posts (403).

Routes (all but the page itself need the API key when one is set; the page
asks for it and sends it as a Bearer header):
    GET  /              the page (serve/static/collect.html)
    GET  /healthz       status, snapshots, labels stored
    POST /api/respond   {"messages": [{"role": "user"|"assistant", "content"}...]}
                        -> {"pair_id", "responses": [text 1, text 2]}; the pair is stored
    POST /api/label     {"pair_id", "choice": "a"|"b"|"tie"|"both_bad", "strength"?: 1-3, "labeler"?}
                        -> 200 once the label is durable; 404 unknown pair, 409 already labeled
Strength 1 ("slightly better") is stored like any label but, as in the paper, not
trained on: the export keeps a person's preferences stronger than the weakest, and
those without a strength (hh_ray/comparisons.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from pydantic import ConfigDict, Field
from ray import serve

from hh_ray.comparisons import AlreadyLabeled, ComparisonStore, StoreError, TextTooLong, UnknownPair
from actors.vllm_engine import make_replica_llm
from hh_ray.runtime import worker_env
from serve.app import (API_KEY_ENV, api_app, block_until_stopped, check_api_key, check_bind, check_engine, deploy,
                       serving_format)
from serve.load import (EngineDead, EngineLoop, LoadArgs, allowed_host_names, check_host, engine_unavailable,
                        generation_timeout, read_body, replica_gpus)
from serve.openai_protocol import APIError, hh_prompt, parse_json_object, policy_prompt

PAGE = Path(__file__).parent / "static" / "collect.html"
PAGE_LABELER_PREFIX = "page:"  # machine labelers write "rule:..." / "pm:..."


class CollectArgs(LoadArgs):
    """Arguments of `build_collect_app` (and of `hh-ray collect`); unknown names are refused. The
    load limits (timeouts, queue, health check, Host check) are LoadArgs' (serve/load.py)."""
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(description="Snapshot A: HF folder, hub name, 'tiny' or 'smollm2'.")
    policy_b: str = Field("", description="Snapshot B; empty = two samples of snapshot A.")
    db: str = Field(description="SQLite comparison database.")
    round: int = Field(0, ge=0, description="Online round the collected pairs belong to.")
    api_key: str = Field("", description=f"Bearer key for the API routes; empty = ${API_KEY_ENV} or none.")
    max_text_chars: int = Field(8000, ge=1, description="Longest message / response text.")
    max_turns: int = Field(16, ge=1, description="Most messages in one conversation.")
    max_request_bytes: int = Field(65536, ge=1024, description="Largest request body.")
    max_new_tokens: int = Field(128, ge=1, description="Response length cap (paper: 128).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature.")
    cpus_per_replica: float = Field(1, gt=0, description="CPUs for the replica (vLLM's threads on CPU).")
    gpus_per_replica: float = Field(-1, ge=-1, description="GPUs per replica; -1 = 1 on a cluster with GPUs, 0 without.")
    kv_cache_gib: float = Field(0.5, gt=0, description="vLLM KV cache per engine in GiB (CPU).")
    max_model_len: int = Field(0, ge=0, description="Prompt + response token limit; 0 = the model's.")
    seed: int = Field(0, description="Engine seed.")
    conversation_format: str = Field("auto", description="'hh', 'chat' or 'auto'; the snapshots' recorded format "
                                                         "wins, and both snapshots must share one.")
    max_ongoing_requests: int = Field(32, ge=1, description="Requests the replica holds at once.")


# ---------------------------------------------------------------- request checks (pure)

def parse_conversation(body: dict, max_turns: int, max_chars: int) -> list[dict]:
    """The messages of /api/respond: user and assistant turns alternating, starting and ending with user."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", "messages", "invalid_type")
    if len(msgs) > max_turns:
        raise APIError(400, f"the conversation has {len(msgs)} messages; the limit is {max_turns}. "
                            "Start a new conversation.", "messages", "too_many_turns")
    out = []
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want or not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] must be {{'role': '{want}', 'content': string}} (turns alternate, "
                                "starting with user)", f"messages[{i}]", "invalid_value")
        if len(m["content"]) > max_chars:
            raise APIError(413, f"messages[{i}] is {len(m['content'])} characters; the limit is {max_chars}",
                           f"messages[{i}].content", "text_too_long")
        if not m["content"].strip():
            raise APIError(400, f"messages[{i}] is empty", f"messages[{i}].content", "invalid_value")
        out.append({"role": want, "content": m["content"]})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", "messages", "invalid_value")
    return out


def store_error_to_api(e: StoreError) -> APIError:
    status = 404 if isinstance(e, UnknownPair) else 409 if isinstance(e, AlreadyLabeled) \
        else 413 if isinstance(e, TextTooLong) else 400
    code = {404: "unknown_pair", 409: "already_labeled", 413: "text_too_long"}.get(status, "invalid_value")
    return APIError(status, str(e), code=code)


def hh_response(text: str) -> str:
    """HH responses follow "Assistant:" after a space; a chat-template policy's text has none."""
    return text if text[:1].isspace() else " " + text


# ---------------------------------------------------------------- the replica

collect_api = api_app("hh-ray collect")


@serve.deployment  # the limits are set by build_collect_app (LoadArgs.deployment_options)
@serve.ingress(collect_api)
class CollectServer:
    def __init__(self, args: dict):
        a = CollectArgs(**args)
        self.args = a
        paths = [a.policy] + ([a.policy_b] if a.policy_b else [])
        # One loop (thread) per engine: requests for different engines run side by side.
        llms = [make_replica_llm(p, a.cpus_per_replica, a.kv_cache_gib, a.max_model_len or None, a.seed + k)
                for k, p in enumerate(paths)]
        self.engines = [EngineLoop(llm, name=f"collect-engine-{k}") for k, llm in enumerate(llms)]
        self.allowed_hosts = allowed_host_names(a.host, a.allowed_hosts)
        self.snapshots = paths
        self.tokenizer = llms[0].get_tokenizer()
        self.max_model_len = llms[0].llm_engine.model_config.max_model_len
        self.store = ComparisonStore(a.db, max_text_chars=a.max_text_chars)
        self.page = PAGE.read_text()
        self.rng = random.Random(a.seed)

    def _check(self, request: Request) -> None:
        check_host(request.headers, self.args.api_key, self.allowed_hosts)
        check_api_key(request, self.args.api_key)

    async def check_health(self):
        """Serve's health check: a failure makes Serve replace this replica."""
        for engine in self.engines:
            check_engine(engine, stall_s=max(60.0, self.args.generation_timeout_s))

    async def _sample(self, engine: int, ids: list[int], n: int, stop: tuple[list[str], list[int]],
                      deadline: float) -> list[str]:
        from actors.vllm_engine import sampling_params

        room = self.max_model_len - len(ids)
        if room < 1:
            raise APIError(400, f"the conversation takes {len(ids)} tokens; this model's context is "
                                f"{self.max_model_len}. Start a new conversation.", "messages",
                           "context_length_exceeded")
        params = sampling_params(min(self.args.max_new_tokens, room), temperature=self.args.temperature,
                                 logprobs=False, n=n, stop=stop[0], stop_token_ids=stop[1])
        out = await self.engines[engine].generate(ids, params, deadline)
        return [c.text for c in out.outputs]

    async def _two_responses(self, messages: list[dict]) -> list[tuple[str, str]]:
        """[(text, snapshot), (text, snapshot)]: one from each snapshot, or two samples of one;
        504 past the generation deadline, 503 if an engine has died."""
        text, *stop = policy_prompt(messages, self.tokenizer, self.args.conversation_format)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        deadline = time.monotonic() + self.args.generation_timeout_s
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                if len(self.engines) == 1:
                    texts = await self._sample(0, ids, 2, stop, deadline)
                    return [(t, self.snapshots[0]) for t in texts]
                texts = await asyncio.gather(*(self._sample(k, ids, 1, stop, deadline) for k in range(2)))
                return [(t[0], s) for t, s in zip(texts, self.snapshots)]
        except TimeoutError:
            raise generation_timeout(self.args.generation_timeout_s) from None
        except EngineDead as e:
            raise engine_unavailable(e, self.args.retry_after_s) from None

    @collect_api.get("/")
    async def page(self, request: Request):
        check_host(request.headers, self.args.api_key, self.allowed_hosts)
        return HTMLResponse(self.page)

    @collect_api.get("/healthz")
    async def healthz(self, request: Request):
        self._check(request)
        labels = await asyncio.to_thread(self.store.count_labels, self.args.round)
        return {"status": "ok", "snapshots": self.snapshots, "round": self.args.round, "labels_this_round": labels,
                "engines": [e.stats() for e in self.engines]}

    @collect_api.post("/api/respond")
    async def respond(self, request: Request):
        self._check(request)
        body = parse_json_object(await read_body(request, self.args.max_request_bytes, self.args.body_timeout_s))
        messages = parse_conversation(body, self.args.max_turns, self.args.max_text_chars)
        pair = await self._two_responses(messages)
        if self.rng.random() < 0.5:  # which snapshot is "1" is random: no position bias per snapshot
            pair.reverse()
        (ra, sa), (rb, sb) = pair
        try:
            pair_id = await asyncio.to_thread(
                self.store.add_pair, hh_prompt(messages), hh_response(ra), hh_response(rb), sa, sb,
                self.args.round, "page")
        except StoreError as e:
            raise store_error_to_api(e) from None
        return {"pair_id": pair_id, "responses": [ra.strip(), rb.strip()]}

    @collect_api.post("/api/label")
    async def label(self, request: Request):
        self._check(request)
        body = parse_json_object(await read_body(request, self.args.max_request_bytes, self.args.body_timeout_s))
        name = body.get("labeler", "anonymous")
        if not isinstance(name, str) or not name.strip():
            name = "anonymous"
        try:
            # Returns once the transaction is committed and fsynced: only then is the label acknowledged.
            await asyncio.to_thread(self.store.add_label, body.get("pair_id"), body.get("choice"),
                                    PAGE_LABELER_PREFIX + name.strip(), body.get("strength"))
        except StoreError as e:
            raise store_error_to_api(e) from None
        return {"status": "recorded", "pair_id": body["pair_id"], "choice": body["choice"]}


# ---------------------------------------------------------------- starting it

def build_collect_app(args: dict) -> serve.Application:
    """Ray Serve app builder (`serve run serve.collect:build_collect_app policy=DIR db=FILE`)."""
    a = CollectArgs(**args)
    from hh_ray.models import resolve_model

    a.policy = resolve_model(a.policy)
    a.conversation_format = serving_format(a.policy, a.conversation_format)
    if a.policy_b:
        a.policy_b = resolve_model(a.policy_b)
        if serving_format(a.policy_b, a.conversation_format) != a.conversation_format:
            raise ValueError(f"policy_b: {a.policy_b} was trained in another conversation format than {a.policy}")
    a.api_key = a.api_key or os.environ.get(API_KEY_ENV, "")
    a.db = str(Path(a.db).resolve())  # the replica's working directory is not ours
    ComparisonStore(a.db, a.max_text_chars)  # creates it now: a bad path fails here, not in the replica
    return CollectServer.options(**a.deployment_options(), ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": replica_gpus(a),
                                                    "runtime_env": {"env_vars": worker_env()}}).bind(a.model_dump())


def start_collect(args: dict, host: str = "127.0.0.1", port: int = 8001, name: str = "hh-ray-collect"):
    check_bind(host, args.get("api_key", ""))
    args = {**args, "host": host}  # the replica answers for the host bound here (the Host check)
    return deploy(build_collect_app(args), host, port, name)


def run_collect_forever(args: dict, host: str = "127.0.0.1", port: int = 8001) -> int:
    """`hh-ray collect`: deploy the page, print where, block until Ctrl-C."""
    check_bind(host, args.get("api_key", ""))
    CollectArgs(**args)  # bad arguments fail before anything starts
    return block_until_stopped(lambda: start_collect(args, host, port),
                               f"hh-ray collect: comparison page at http://{host}:{port}/ "
                               f"(database {Path(args['db']).resolve()}); Ctrl-C to stop")
