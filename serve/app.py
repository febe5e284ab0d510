"""Ray Serve application: OpenAI-compatible chat completions for a trained policy,
best-of-n with the PM (the paper's rejection-sampling baseline), an OOD flag.

Start it with `hh-ray serve --policy DIR ...`, or with Ray Serve's own tools:

    serve run serve.app:build_app policy=/path/to/policy pm=/path/to/pm best_of_n=4
    serve deploy serve/serve_config.yaml

One replica = one in-process vLLM engine (on CPU the multiprocess engine
pins cores and sits outside Ray's CPU accounting; docs/architecture.md).
The engine is stepped by one thread of its own (`serve.load.EngineLoop`):
concurrent requests join the running batch between two steps (measured,
SmolLM2-135M on 2 CPUs, 64 tokens: one client p50 4.8 s, four concurrent
clients p50 6.2 s for 3x the answers per second), and the event loop stays
free for /healthz and for validating the next requests.

Under load and faults (serve/load.py): a body not received within
`body_timeout_s` gets 408; a response not ready within `generation_timeout_s`
gets 504 and the engine drops the request; past `max_ongoing_requests` per
replica and `max_queued_requests` waiting, Serve refuses at once with 503 (or
429) and Retry-After; a replica whose engine or PM actor died fails its
health check and is replaced. With no API key, requests whose Host header is
not the bound host are refused (421), against DNS rebinding, and so are those
from a foreign web Origin (403).

Best-of-n: one vLLM request samples n x best_of candidates (the prompt's KV
is shared); the PM scoring actor (actors/pm_service.py, owned by the replica)
scores them as HH transcripts, and each choice is the best of its group.

Streaming is the OpenAI SSE protocol, but the engine is the batch
engine's final output: the role chunk goes out at once and the text when the
response is complete, not token by token.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.vllm_engine import make_replica_llm
from hh_ray.conversation import model_format, pm_format
from hh_ray.runtime import worker_env
from serve.load import (EngineDead, EngineLoop, LoadArgs, allowed_host_names, check_host, engine_unavailable,
                        generation_timeout, read_body, replica_gpus)
from serve.openai_protocol import (APIError, ChatRequest, Limits, chunk_body, completion_body, completion_id,
                                   error_body, hh_prompt, parse_chat_request, policy_prompt, sse)

API_KEY_ENV = "HH_RAY_API_KEY"


class ServeArgs(LoadArgs):
    """Arguments of `build_app` (and of `hh-ray serve`); unknown names are refused. The load
    limits (timeouts, queue, health check, Host check) are LoadArgs' (serve/load.py)."""
    model_config = ConfigDict(extra="forbid")

    policy: str = Field(description="Policy: HF folder, hub name, 'tiny' or 'smollm2'.")
    pm: str = Field("", description="PM folder for best-of-n; empty = no PM.")
    best_of_n: int = Field(1, ge=1, description="Default candidates per choice, ranked by the PM (needs pm).")
    replicas: int = Field(1, ge=1, description="Serve replicas, each one vLLM engine.")
    api_key: str = Field("", description=f"Bearer key required on every route; empty = ${API_KEY_ENV} or none.")
    ood: str = Field("", description="OOD detector folder (hh_ray/ood.py format); empty = no OOD score.")
    ood_refuse: bool = Field(False, description="Refuse (finish_reason 'content_filter') prompts the detector flags.")
    model_name: str = Field("", description="Model id in /v1/models; empty = the policy folder's name.")
    cpus_per_replica: float = Field(1, gt=0, description="CPUs per replica (vLLM's threads on CPU).")
    gpus_per_replica: float = Field(-1, ge=-1, description="GPUs per replica; -1 = 1 on a cluster with GPUs, 0 without.")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM KV cache per replica in GiB (CPU).")
    max_model_len: int = Field(0, ge=0, description="Prompt + response token limit; 0 = the model's.")
    pm_max_len: int = Field(512, ge=8, description="Transcript tokens the PM reads (truncated from the left).")
    max_tokens: int = Field(512, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request gives none (paper: 128).")
    max_n: int = Field(8, ge=1, description="Largest n a request may ask for.")
    max_best_of: int = Field(16, ge=1, description="Largest best_of (extension field) a request may ask for.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body in bytes.")
    max_batch_size: int = Field(32, ge=1, description="Requests in the engine at once (more wait in the replica).")
    batch_wait_ms: float = Field(10.0, ge=0, description="How long an idle engine waits for more requests to "
                                                         "start with.")
    seed: int = Field(0, description="Engine seed.")
    conversation_format: str = Field("auto", description="'hh', 'chat' or 'auto'; the policy folder's recorded "
                                                         "format wins, and a contradicting one is refused.")

    def limits(self) -> Limits:
        return Limits(max_request_bytes=self.max_request_bytes, max_tokens=self.max_tokens,
                      default_max_tokens=min(self.default_max_tokens, self.max_tokens), max_n=self.max_n,
                      max_best_of=self.max_best_of)


def _error(status: int, message: str, type: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, code=code), status_code=status)


def api_app(title: str) -> FastAPI:
    """A FastAPI app whose every error is an OpenAI-shaped JSON body (this app and serve/collect.py)."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):  # unknown path, wrong method
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return _error(400, str(e))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        # A bug or an engine failure: still an OpenAI-shaped body, and the replica lives on.
        return _error(500, f"internal error: {type(e).__name__}: {e}", type="server_error")

    return app


def check_api_key(request: Request, api_key: str) -> None:
    """401 unless the request carries 'Authorization: Bearer <api_key>' (no key: everyone may)."""
    if not api_key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                       code="invalid_api_key")


async def pm_alive(pm, timeout_s: float) -> None:
    """Raise unless the PM actor answers within timeout_s (a health check)."""
    async def ping():
        await pm.__ray_ready__.remote()

    try:
        await asyncio.wait_for(ping(), timeout_s)
    except Exception as e:  # noqa: BLE001 - dead (RayActorError) or hung (TimeoutError): either fails the check
        raise RuntimeError(f"the PM actor does not answer: {type(e).__name__}: {e}") from None


def check_engine(engine: EngineLoop, stall_s: float) -> None:
    """Raise if the engine loop has died or had work without finishing a step for stall_s."""
    engine.check()
    if (stalled := engine.stalled_for()) > stall_s:
        raise RuntimeError(f"the engine has had work and made no step for {stalled:.0f} s")


api = api_app("hh-ray")


@serve.deployment  # the limits are set by build_app (LoadArgs.deployment_options)
@serve.ingress(api)
class ChatServer:
    def __init__(self, args: dict):
        a = ServeArgs(**args)
        self.args, self.limits = a, a.limits()
        self.api_key = a.api_key
        self.allowed_hosts = allowed_host_names(a.host, a.allowed_hosts)
        self.model_name = a.model_name or Path(a.policy).name
        self.format = a.conversation_format  # resolved by build_app: the format the policy was trained in
        self.llm = make_replica_llm(a.policy, a.cpus_per_replica, a.kv_cache_gib, a.max_model_len or None, a.seed)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.engine = EngineLoop(self.llm, a.max_batch_size, a.batch_wait_ms / 1000, name="hh-ray-engine")
        self.pm = None
        if a.pm:
            from actors.pm_service import start_pm_scorer

            # The rollout side's scorer, owned by this replica (it dies with it).
            self.pm = start_pm_scorer(a.pm, max_len=a.pm_max_len, conversation_format=pm_format(a.pm))
        self.ood = self.ood_model = None
        if a.ood:
            from hh_ray.models import load_policy
            from hh_ray.ood import OODDetector

            # vLLM does not expose a middle layer's activations: the detector reads an HF copy.
            self.ood = OODDetector.load(a.ood)
            self.ood_model = load_policy(a.policy).eval()
            if self.ood.dim != self.ood_model.config.hidden_size:
                raise ValueError(f"OOD detector {a.ood} was fitted on width {self.ood.dim}; the policy's "
                                 f"hidden size is {self.ood_model.config.hidden_size}")
        from ray.serve import metrics

        self.tokens_counter = metrics.Counter("hh_ray_completion_tokens", "Tokens generated (all candidates).")
        self.flagged_counter = metrics.Counter("hh_ray_ood_flagged", "Prompts the OOD detector flagged.")
        if self.pm is not None:  # ready only with its PM (started meanwhile): the health check pings it
            import ray

            ray.get(self.pm.__ray_ready__.remote())

    # ------------------------------------------------------------ helpers

    def _authorize(self, request: Request) -> None:
        check_host(request.headers, self.api_key, self.allowed_hosts)
        check_api_key(request, self.api_key)

    async def _read_body(self, request: Request) -> bytes:
        return await read_body(request, self.limits.max_request_bytes, self.args.body_timeout_s)

    async def check_health(self):
        """Serve's health check: a failure makes Serve replace this replica (and its PM actor)."""
        check_engine(self.engine, stall_s=max(60.0, self.args.generation_timeout_s))
        if self.pm is not None:
            await pm_alive(self.pm, self.args.health_check_timeout_s / 2)

    def _sampling(self, req: ChatRequest, best_of: int, default_stop: list[str], stop_ids: list[int], prompt_len: int):
        from actors.vllm_engine import sampling_params

        room = self.max_model_len - prompt_len
        if room < 1 or (req.max_tokens_given and req.max_tokens > room):
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens; the "
                                f"messages take {prompt_len} and max_tokens asks for {req.max_tokens}. "
                                "Shorten the messages or lower max_tokens.", "messages", "context_length_exceeded")
        return sampling_params(min(req.max_tokens, room), temperature=req.temperature, top_p=req.top_p,
                               seed=req.seed, logprobs=False, n=req.n * best_of, stop=req.stop + default_stop,
                               stop_token_ids=stop_ids,
                               presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)

    def _ood_score(self, text: str) -> float:
        from hh_ray.ood import last_prompt_token_activations

        x = last_prompt_token_activations(self.ood_model, self.tokenizer, [text], self.ood.layer,
                                          max_len=self.max_model_len)
        return float(self.ood.score(x)[0])

    def _prepare(self, req: ChatRequest) -> dict:
        """Every check that needs no engine, so that it fails with a 4xx status even for a stream."""
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        best_of = req.best_of if req.best_of is not None else self.args.best_of_n
        if best_of > 1 and self.pm is None:
            raise APIError(400, "best_of > 1 needs a preference model; start the server with --pm",
                           "best_of", "unsupported_parameter")
        if req.n * best_of > self.limits.max_best_of * self.limits.max_n:
            raise APIError(400, f"n x best_of = {req.n * best_of} candidates is over the limit", "best_of")
        text, default_stop, stop_ids = policy_prompt(req.messages, self.tokenizer, self.format)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        params = self._sampling(req, best_of, default_stop, stop_ids, len(ids))
        # The HH transcript is what the PM and the OOD detector were fitted on.
        return dict(req=req, ids=ids, params=params, best_of=best_of, hh=hh_prompt(req.messages),
                    deadline=time.monotonic() + self.args.generation_timeout_s)

    async def _complete_in_time(self, job: dict) -> tuple[list[dict], dict, dict]:
        """`_complete` within the request's deadline: 504 past it, 503 if the engine has died."""
        try:
            async with asyncio.timeout(job["deadline"] - time.monotonic()):
                return await self._complete(job)
        except TimeoutError:
            raise generation_timeout(self.args.generation_timeout_s) from None
        except EngineDead as e:
            raise engine_unavailable(e, self.args.retry_after_s) from None

    async def _complete(self, job: dict) -> tuple[list[dict], dict, dict]:
        """(choices [{"text", "finish_reason"}], usage, extension) for a prepared request."""
        req, ids, params, best_of, hh = job["req"], job["ids"], job["params"], job["best_of"], job["hh"]
        extension: dict = {"best_of_n": best_of}

        ood_task = asyncio.create_task(asyncio.to_thread(self._ood_score, hh)) if self.ood else None
        if ood_task is not None and self.args.ood_refuse:
            score = await ood_task
            extension["ood"] = self._ood_extension(score)
            if extension["ood"]["flagged"]:
                usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
                return [{"text": "", "finish_reason": "content_filter"}] * req.n, usage, extension
            ood_task = None
        out = await self.engine.generate(ids, params, job["deadline"])
        cands = out.outputs
        n_tokens = sum(len(c.token_ids) for c in cands)
        self.tokens_counter.inc(n_tokens)
        choices = [{"text": c.text, "finish_reason": c.finish_reason or "length"} for c in cands]
        if best_of > 1:
            # HH responses follow "Assistant:" after a space; a chat-template policy's text has none.
            resp = [c["text"] if c["text"][:1].isspace() else " " + c["text"] for c in choices]
            scores = await self.pm.score.remote([hh] * len(resp), resp)
            picked, best, groups = [], [], []
            for j in range(req.n):
                g = scores[j * best_of:(j + 1) * best_of]
                k = max(range(best_of), key=g.__getitem__)
                picked.append(choices[j * best_of + k])
                best.append(g[k])
                groups.append(g)
            choices = picked
            extension.update(pm_scores=best, candidate_pm_scores=groups)
        if ood_task is not None:
            extension["ood"] = self._ood_extension(await ood_task)
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_tokens, "total_tokens": len(ids) + n_tokens}
        return choices, usage, extension

    def _ood_extension(self, score: float) -> dict:
        flagged = score > self.ood.threshold
        if flagged:
            self.flagged_counter.inc()
        return {"score": score, "threshold": self.ood.threshold, "flagged": bool(flagged)}

    async def _stream(self, job: dict, cid: str):
        req, created = job["req"], int(time.time())
        for i in range(req.n):  # at once: the client sees the response start before the batch runs
            yield sse(chunk_body(cid, created, self.model_name, i, {"role": "assistant", "content": ""}))
        try:
            choices, usage, extension = await self._complete_in_time(job)
        except APIError as e:  # after the 200 header, an error travels as an SSE event
            yield sse(e.body())
            yield sse("[DONE]")
            return
        except Exception as e:  # noqa: BLE001 - reported to the client, the replica lives on
            yield sse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
            yield sse("[DONE]")
            return
        for i, c in enumerate(choices):
            if c["text"]:
                yield sse(chunk_body(cid, created, self.model_name, i, {"content": c["text"]}))
            last = i == len(choices) - 1
            yield sse(chunk_body(cid, created, self.model_name, i, {}, c["finish_reason"],
                                 **({"hh_ray": extension} if last else {})))
        if req.include_usage:
            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                       "choices": [], "usage": usage})
        yield sse("[DONE]")

    # ------------------------------------------------------------ routes

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        job = self._prepare(parse_chat_request(await self._read_body(request), self.limits))
        if job["req"].stream:
            return StreamingResponse(self._stream(job, completion_id()), media_type="text/event-stream")
        choices, usage, extension = await self._complete_in_time(job)
        return completion_body(completion_id(), self.model_name, choices, usage, extension)

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "hh-ray", "max_model_len": self.max_model_len}]}

    @api.get("/healthz")
    async def healthz(self, request: Request):
        self._authorize(request)
        return {"status": "ok", "model": self.model_name, "best_of_n": self.args.best_of_n,
                "pm": self.pm is not None, "ood": self.ood is not None, "conversation_format": self.format,
                "engine": self.engine.stats(),
                "replica": serve.get_replica_context().replica_id.unique_id}  # which replica answered


def build_app(args: dict) -> serve.Application:
    """Ray Serve app builder (`serve run serve.app:build_app policy=DIR ...`). The API
    key is resolved here, where the command runs: flag, else $HH_RAY_API_KEY."""
    a = ServeArgs(**args)
    from hh_ray.models import resolve_model

    a.policy = resolve_model(a.policy)
    a.conversation_format = serving_format(a.policy, a.conversation_format, a.pm)
    if a.best_of_n > 1 and not a.pm:
        raise ValueError(f"best_of_n={a.best_of_n} needs a preference model (pm=DIR / --pm DIR)")
    for name in ("pm", "ood"):
        path = getattr(a, name)
        if path and not Path(path).exists():
            raise ValueError(f"{name}: {path} does not exist")
    a.api_key = a.api_key or os.environ.get(API_KEY_ENV, "")
    # OMP threads follow num_cpus; the PM scorer the replica starts asks for one more CPU.
    return ChatServer.options(num_replicas=a.replicas, **a.deployment_options(),
                              ray_actor_options={"num_cpus": a.cpus_per_replica, "num_gpus": replica_gpus(a),
                                                 "runtime_env": {"env_vars": worker_env()}}).bind(a.model_dump())


def serving_format(policy: str, requested: str, pm: str = "") -> str:
    """The format a policy is served in: the one it was trained in (its folder's record), checked
    against the PM's, before any replica starts."""
    from hh_ray.models import load_tokenizer

    fmt = model_format(policy, requested, load_tokenizer(policy))
    if pm and Path(pm).exists() and pm_format(pm) != fmt:
        raise ValueError(f"pm: {pm} scores conversations in the {pm_format(pm)!r} format, the policy "
                         f"{policy} is served in {fmt!r}")
    return fmt


def check_bind(host: str, api_key: str) -> None:
    """Off the loopback interface an API key is required: the server would answer anyone."""
    if host not in ("127.0.0.1", "localhost", "::1") and not (api_key or os.environ.get(API_KEY_ENV)):
        raise ValueError(f"binding to {host} without an API key would serve anyone who can reach it: "
                         f"set --api-key or ${API_KEY_ENV}")


def deploy(app: serve.Application, host: str, port: int, name: str):
    """Start Serve's HTTP proxy on host:port and run the app at '/' (Ray connected by the caller)."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix="/")


def start(args: dict, host: str = "127.0.0.1", port: int = 8000, name: str = "hh-ray",
          require_key_off_loopback: bool = True):
    """Start Serve's HTTP proxy on host:port and deploy the app; returns its handle."""
    args = {**args, "host": host}  # the replicas answer for the host bound here (the Host check)
    a = ServeArgs(**args)
    if require_key_off_loopback:
        check_bind(host, a.api_key)
    app = build_app(args)  # bad arguments fail here, before Ray starts or a port is bound
    return deploy(app, host, port, name)


def block_until_stopped(start_fn, banner: str) -> int:
    """Run start_fn(), print banner, block until Ctrl-C / SIGTERM, then shut Serve down."""
    import signal

    try:
        start_fn()
        # After ray.init, which installs its own (aborting) SIGTERM handler: SIGTERM
        # (kill, systemd, docker stop) and a SIGINT a background job inherited as
        # ignored both end in the clean shutdown below.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        print(banner, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        if ray.is_initialized():  # serve.shutdown() would start a Ray just to find nothing
            serve.shutdown()
    return 0


def run_forever(args: dict, host: str = "127.0.0.1", port: int = 8000) -> int:
    """`hh-ray serve`: deploy, print where, block until Ctrl-C, then shut Serve down."""
    build_app(args)  # bad arguments fail before anything starts
    key = " (API key required)" if (args.get("api_key") or os.environ.get(API_KEY_ENV)) else ""
    return block_until_stopped(lambda: start(args, host, port),
                               f"hh-ray serve: OpenAI-compatible API at http://{host}:{port}/v1{key}; Ctrl-C to stop")
