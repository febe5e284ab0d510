"""vLLM generation workers: prompts in, rollouts (token ids + behaviour log-probs +
policy version) out, and weight sync from the learner.

A `GenerationWorker` is one Ray actor holding one vLLM engine (in-process on
CPU: VLLM_ENABLE_V1_MULTIPROCESSING=0, so the engine stays inside the actor's
CPU share; docs/architecture.md). A `GenerationPool` is the controller's view of N workers:
it spreads a batch of prompts over them and broadcasts weights to all of them.

Two weight syncs, and every worker takes both:
- broadcast (`generation.weight_sync: broadcast`): the learner's rank 0 drives it
  (learners/weight_sync.py). It forms one process group with every worker
  (`join_weight_group`), then broadcasts the weights in buckets, which each worker's
  engine receives through vLLM's weight-transfer API (`receive_weights`,
  actors/weight_transfer.py);
- object store: the learner publishes its state dict as one ObjectRef
  (hh_ray.weights); each worker fetches it and reloads it in place with
  `collective_rpc("reload_weights")`. Names and shapes are checked first, so a bad dict
  is refused whole and the engine keeps its old weights. A broadcast run uses it to
  start a revived worker, and to restore a checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time

import ray
import torch

from hh_ray.config import GenerationConfig, parse_resources
from hh_ray.conversation import end_of_turn_token_ids, stop_strings
from hh_ray.rollout import RolloutBatch, tokens_before_stop
from hh_ray.runtime import gpus_for, malloc_in_use, set_torch_threads, worker_env
from hh_ray.weights import as_tensors


class GenerationInputError(ValueError):
    """A prompt the engine cannot take (empty, too long, unknown token ids)."""


class WeightUpdateError(ValueError):
    """A weight dict that does not fit the engine's model; nothing was loaded."""


class StaleWeightsError(RuntimeError):
    """Sync mode: a worker asked to generate with a version other than the expected one."""


class IncompleteWeightsError(StaleWeightsError):
    """The worker's last weight broadcast was cut off half-way (its sender or another member
    died): vLLM's layer-wise reload has left the layers it did not receive unloaded, so a
    forward pass would fail mid-step. The next complete sync mends it."""


def expected_weights(model_path: str) -> tuple[dict[str, tuple[int, ...]], set[str], dict[str, str]]:
    """(every name a learner's `state_dict()` holds -> shape, the names that must be present,
    tied alias -> the name it is tied to).

    Built from the HF config on the meta device, so it costs no memory and
    matches what the learner sends. Tied weights (e.g. `lm_head.weight` tied to
    the embeddings) appear once in `named_parameters` and twice in
    `state_dict`: the alias may be sent or left out (a model folder's file
    leaves it out).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    required = set(params) | {k for k, _ in model.named_buffers() if k in shapes}  # persistent buffers only
    owner = {id(p): k for k, p in params.items()}
    tied = {k: owner[id(v)] for k, v in model.state_dict(keep_vars=True).items() if k not in params and id(v) in owner}
    return shapes, required, tied


def check_weights(weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                  required: set[str]) -> None:
    """Raise WeightUpdateError listing every missing, unknown or mis-shaped tensor."""
    if not isinstance(weights, dict):
        raise WeightUpdateError(f"weights must be a state dict (name -> tensor), got {type(weights).__name__}")
    problems = []
    missing = sorted(required - weights.keys())
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unknown = sorted(weights.keys() - shapes.keys())
    if unknown:
        problems.append(f"unknown name(s): {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    for name, t in weights.items():
        if name not in shapes:
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name}: not a tensor ({type(t).__name__})")
        elif tuple(t.shape) != shapes[name]:
            problems.append(f"{name}: shape {tuple(t.shape)}, the engine's model has {shapes[name]}")
        elif not t.is_floating_point():
            problems.append(f"{name}: dtype {t.dtype} is not floating point")
    if problems:
        raise WeightUpdateError("weight update refused, the engine keeps its previous weights: "
                                + "; ".join(problems))


def check_prompts(prompt_ids: list[list[int]], max_model_len: int, vocab_size: int) -> None:
    """Refuse what vLLM would reject mid-batch (or silently mis-handle), naming the prompt."""
    if not prompt_ids:
        raise GenerationInputError("no prompts given")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise GenerationInputError(f"prompt {i} is empty (no tokens)")
        if len(p) >= max_model_len:
            raise GenerationInputError(
                f"prompt {i} has {len(p)} tokens; the engine's max length is {max_model_len} "
                f"(prompt + response), so at most {max_model_len - 1} prompt tokens fit. "
                "Truncate prompts from the left or raise model.max_seq_len.")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise GenerationInputError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})")


@ray.remote
class GenerationWorker:
    """One vLLM engine. Start it with `start_generation_worker` (which sets num_cpus)."""

    def __init__(self, model_path: str, gen_cfg: GenerationConfig, max_model_len: int,
                 dtype: str = "float32", seed: int = 0, conversation_format: str = "hh"):
        set_torch_threads(gen_cfg.cpus_per_worker)
        from actors.vllm_engine import make_llm

        # Every in-place reload warns that the rotary embedding "failed to load weights": its
        # cos/sin cache is computed, not loaded, and is put back as it was.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

        self.gen_cfg = gen_cfg
        self.llm = make_llm(model_path, gen_cfg, max_model_len, dtype, seed)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.tokenizer = self.llm.get_tokenizer()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.shapes, self.required, self.tied = expected_weights(model_path)
        self._version = 0
        # The assistant's turn ends at the format's end-of-turn token (kept: the policy learns
        # to end its turn) or where the next human turn would start (cut: not the policy's text).
        self.stop = {"stop": stop_strings(conversation_format),
                     "stop_token_ids": end_of_turn_token_ids(self.tokenizer, conversation_format)}

    # ------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[list[int]], prompts: list[str] | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | list[int] | None = 0,
                 expected_version: int | None = None, stop: list[str] | None = None, n: int = 1) -> RolloutBatch:
        """Sample `n` responses per prompt (one request: the prompt is prefilled once), rows
        ordered prompt by prompt; each ends with the turn (the conversation format's
        end-of-turn token, kept, or its stop string, cut) or at max_new_tokens. `stop`: more stop
        strings, cut like the format's.

        `seed`: an int seeds sample i with `seed + i`, a list gives each sample
        its own seed (the pool passes the prompt's index in the whole batch, so
        a response does not depend on which worker or chunk it landed in);
        None = unseeded. `expected_version` (sync mode) refuses to run on other
        weights.
        """
        from actors.vllm_engine import sampling_params

        if self._version < 0:
            raise IncompleteWeightsError("this worker's last weight broadcast was cut off half-way, so some layers "
                                         "hold no weights; it generates again after the next complete weight sync")
        if expected_version is not None and self._version != expected_version:
            raise StaleWeightsError(f"worker holds policy version {self._version}, expected {expected_version}: "
                                    "it missed a weight update; refusing to generate with stale weights (sync mode)")
        prompt_ids = [list(map(int, p)) for p in prompt_ids]
        if prompts is not None and len(prompts) != len(prompt_ids):
            raise GenerationInputError(f"{len(prompt_ids)} prompt token lists but {len(prompts)} prompt texts")
        check_prompts(prompt_ids, self.max_model_len, self.vocab_size)
        g = self.gen_cfg
        kw = dict(max_new_tokens=max_new_tokens or g.max_new_tokens,
                  temperature=g.temperature if temperature is None else temperature,
                  top_p=g.top_p if top_p is None else top_p)
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(len(prompt_ids))]
        elif len(seed) == len(prompt_ids):
            seeds = list(seed)
        else:
            raise GenerationInputError(f"{len(prompt_ids)} prompts but {len(seed)} seeds")
        stops = self.stop["stop"] + list(stop or [])
        params = [sampling_params(seed=s, **kw, n=n, stop=stops, stop_token_ids=self.stop["stop_token_ids"])
                  for s in seeds]
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        except BaseException:
            self._abort_unfinished()
            raise
        response_ids, logprobs, texts, reasons = [], [], [], []
        for c in (c for out in outs for c in sorted(out.outputs, key=lambda c: c.index)):
            ids = list(c.token_ids)
            cut = c.stop_reason in stops  # a stop string: its tokens are not the response's
            if cut:
                ids = ids[: tokens_before_stop(ids, c.text, self._decode)]
            response_ids.append(ids)
            # logprobs=0: each step's dict holds the sampled token only.
            logprobs.append([step[t].logprob for step, t in zip(c.logprobs, ids)])
            texts.append(self._decode(ids) if cut else c.text)
            reasons.append(c.finish_reason or "length")
        if prompts is None:
            prompts = self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
        each = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
        return RolloutBatch.from_samples(each(prompt_ids), response_ids, logprobs, [self._version] * len(response_ids),
                                         each(prompts), texts, reasons, self.pad_id)

    def _abort_unfinished(self) -> None:
        """A generate that failed mid-step leaves its requests in the engine, holding KV blocks:
        the next generate would run them too and wait for them forever. They are aborted, as vLLM
        aborts the requests of a batch it could not add."""
        engine = self.llm.llm_engine
        engine.abort_request(list(engine.output_processor.request_states), internal=True)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------ weight sync: object store

    def update_weights(self, version: int, weights_ref: list) -> int:
        """Load a learner's state dict in place and hold `version` from now on.

        `weights_ref` is `[ObjectRef]` (wrapped so Ray hands the ref over
        instead of resolving it on the way) or `[state_dict]`. Validated
        before anything is loaded: on error the old weights and version stay.
        """
        if not isinstance(weights_ref, (list, tuple)) or len(weights_ref) != 1:
            raise WeightUpdateError("pass the weights as [ObjectRef] (a one-element list)")
        item = weights_ref[0]
        weights = as_tensors(ray.get(item) if isinstance(item, ray.ObjectRef) else item)
        check_weights(weights, self.shapes, self.required)
        # vLLM's layer-wise reload keeps a tied output layer stale unless its alias comes too.
        weights = {**weights, **{alias: weights[name] for alias, name in self.tied.items() if alias not in weights}}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        # Prefix-cached KV blocks were computed by the old weights.
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return self._version

    def load_files(self, version: int, files: list[str]) -> int:
        """`update_weights` from safetensors files read here, on this worker's node (a policy
        folder's weights, a checkpoint's policy file): none of it passes through the driver or
        the object store. Checked as `update_weights` checks."""
        from safetensors.torch import load_file

        weights = {}
        for f in files:
            weights.update(load_file(f))
        return self.update_weights(version, [weights])

    # ------------------------------------------------------------ weight sync: broadcast

    def join_weight_group(self, info: dict) -> None:
        """Join the learner's broadcast group (blocks until every member has joined); a
        group this engine was in before is left first."""
        self.llm.collective_rpc("init_weight_transfer_engine", args=(info,))

    def gpu_uuids(self) -> list[str]:
        """The GPUs this engine runs on (the broadcast's sender picks its backend from them)."""
        import torch

        from hh_ray.runtime import device

        if device().type != "cuda":
            return []
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]

    def receive_weights(self, version: int, update: dict) -> int:
        """Receive one broadcast of the weights (as learner rank 0 sends it) and hold `version`.
        A broadcast cut off half-way leaves the layers not yet received unloaded: the worker then
        holds no valid version (-1) and refuses to generate until the next complete update."""
        try:
            self.llm.collective_rpc("start_weight_update")
            self._version = -1
            self.llm.collective_rpc("update_weights", args=(update,))
            self.llm.collective_rpc("finish_weight_update")
        except BaseException:
            try:  # the group is unusable after a failed collective; the next sync forms a new one
                self.llm.collective_rpc("shutdown_weight_transfer_engine")
            except Exception:  # noqa: BLE001 - the broadcast's own error is the one to see
                pass
            raise
        self.llm.reset_prefix_cache()
        self._version = int(version)
        return self._version

    def version(self) -> int:
        return self._version

    def info(self) -> dict:
        return {"version": self._version, "pid": os.getpid(), "max_model_len": self.max_model_len, "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "weight_sync": self.gen_cfg.weight_sync,
                "node_id": ray.get_runtime_context().get_node_id(), "gpus": ray.get_gpu_ids(), "malloc": malloc_in_use()}


def start_generation_worker(model_path: str, gen_cfg: GenerationConfig, max_model_len: int,
                            dtype: str = "float32", seed: int = 0, conversation_format: str = "hh"):
    """A GenerationWorker with its resources: `cpus_per_worker` CPUs (Ray sets
    OMP_NUM_THREADS from it) and `generation.num_gpus` GPUs (by default, on a GPU
    cluster, `tensor_parallel_size`)."""
    gpus = gpus_for(gen_cfg.num_gpus, ray.cluster_resources().get("GPU", 0), gen_cfg.tensor_parallel_size)
    opts = dict(num_cpus=gen_cfg.cpus_per_worker, num_gpus=gpus, runtime_env={"env_vars": worker_env()},
                resources=parse_resources(gen_cfg.resources, "generation.resources"))
    return GenerationWorker.options(**opts).remote(model_path, gen_cfg, max_model_len, dtype, seed, conversation_format)


def stop_hung(actor, name: str, work: str, limit: float) -> None:
    """Kill an actor that gave no result for `work` within `limit` seconds (generation.timeout_s):
    the result it owes then fails with RayActorError, which the callers take as its death."""
    print(f"{name} gave no result for its {work} in {limit:.0f} s (generation.timeout_s): stopping it as hung",
          flush=True)
    ray.kill(actor, no_restart=True)


def get_all(refs: list) -> list:
    """`ray.get` every ref even when one fails, then raise the first error:
    a plain `ray.get(list)` stops at the first and Ray logs the rest as unhandled."""
    results, first = [], None
    for r in refs:
        try:
            results.append(ray.get(r))
        except Exception as e:  # noqa: BLE001 - re-raised below
            results.append(None)
            first = first or e
    if first is not None:
        raise first
    return results


class GenerationPool:
    """N generation workers seen as one sampler (a plain object: the controller holds it).

    Load balance: prompts are sorted longest first and cut into
    `chunks_per_worker` x N chunks of equal token budget (prompt +
    max_new_tokens); each worker takes the next chunk when it finishes one.
    Response lengths are unknown in advance, so a static split lets the
    unluckiest worker set the pace; small chunks from a shared queue even it
    out, at the price of smaller vLLM batches.
    """

    def __init__(self, model_path: str, gen_cfg: GenerationConfig, max_model_len: int,
                 dtype: str = "float32", seed: int = 0, chunks_per_worker: int = 4,
                 conversation_format: str = "hh", wait: bool = True):
        """`wait=False`: return once the workers are asked for, so that other actors start while
        the engines do; `wait_ready()` before the pool is used."""
        if gen_cfg.num_workers < 1:
            raise ValueError(f"generation.num_workers must be >= 1, got {gen_cfg.num_workers}")
        self.gen_cfg = gen_cfg
        self.chunks_per_worker = chunks_per_worker
        self._start_args = (model_path, gen_cfg, max_model_len, dtype)
        self._seed, self.conversation_format = seed, conversation_format
        # Different engine seeds: unseeded requests must not repeat across workers.
        self.workers = [self._start_worker(k) for k in range(gen_cfg.num_workers)]
        self._starting = [w.info.remote() for w in self.workers]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every engine is up (a worker that failed to start raises here)."""
        infos = get_all(self._starting)
        self.pad_id = infos[0]["pad_id"]
        self.max_model_len = infos[0]["max_model_len"]
        self.vocab_size = infos[0]["vocab_size"]

    def _start_worker(self, k: int):
        return start_generation_worker(*self._start_args, self._seed + k, self.conversation_format)

    def _chunks(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        n_chunks = min(len(prompt_ids), len(self.workers) * self.chunks_per_worker)
        if len(self.workers) == 1:
            n_chunks = 1  # nothing to balance; one batch is what vLLM runs fastest
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        budget = sum(len(p) + max_new_tokens for p in prompt_ids) / n_chunks
        chunks, cur, cost = [], [], 0.0
        for i in order:
            cur.append(i)
            cost += len(prompt_ids[i]) + max_new_tokens
            if cost >= budget and len(chunks) < n_chunks - 1:
                chunks.append(cur)
                cur, cost = [], 0.0
        if cur:
            chunks.append(cur)
        return chunks

    def generate(self, prompt_ids: list[list[int]], prompts: list[str] | None = None,
                 max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = 0,
                 expected_version: int | None = None, stop: list[str] | None = None, n: int = 1) -> RolloutBatch:
        """`n` responses per prompt, prompts in input order, a prompt's samples together
        (see GenerationWorker.generate)."""
        # Checked here too, so an error names the prompt's index in the caller's list.
        check_prompts(prompt_ids, self.max_model_len, self.vocab_size)
        if prompts is not None and len(prompts) != len(prompt_ids):
            raise GenerationInputError(f"{len(prompt_ids)} prompt token lists but {len(prompts)} prompt texts")
        max_new = max_new_tokens or self.gen_cfg.max_new_tokens
        pending = list(reversed(self._chunks(prompt_ids, max_new)))  # pop() takes the longest first

        limit = self.gen_cfg.timeout_s
        in_flight = {}  # ref -> (its prompts, its worker, when it is taken for hung)
        number = {id(w): k for k, w in enumerate(self.workers)}  # for messages

        def submit(worker):
            idx = pending.pop()
            ref = worker.generate.remote(
                [prompt_ids[i] for i in idx], None if prompts is None else [prompts[i] for i in idx],
                max_new, temperature, top_p, None if seed is None else [seed + i for i in idx],
                expected_version, stop, n)
            in_flight[ref] = (idx, worker, time.monotonic() + limit if limit else math.inf)

        for w in self.workers[:len(pending)]:
            submit(w)
        parts, error = [], None
        while in_flight:
            first = min(d for _, _, d in in_flight.values())
            ready, _ = ray.wait(list(in_flight), num_returns=1,
                                timeout=None if first == math.inf else max(0.0, first - time.monotonic()))
            if not ready:  # a worker past its deadline: stopped, so that its result fails as a dead actor's
                for ref, (idx, w, d) in in_flight.items():
                    if d <= time.monotonic():
                        stop_hung(w, f"generation worker {number[id(w)]}", f"{len(idx)} prompt(s)", limit)
                        in_flight[ref] = (idx, w, math.inf)
                continue
            idx, w, _ = in_flight.pop(ready[0])
            try:
                parts.append((idx, ray.get(ready[0])))
            except Exception as e:  # noqa: BLE001 - raised once the others finished (their errors seen)
                error = error or e
            if pending and error is None:
                submit(w)
        if error is not None:
            raise error
        batch = RolloutBatch.concat([b for _, b in parts], self.pad_id)
        position = [(i, j) for idx, _ in parts for i in idx for j in range(n)]
        return batch.select(sorted(range(len(position)), key=position.__getitem__))

    # ------------------------------------------------------------ weights

    def versions(self) -> list[int]:
        return ray.get([w.version.remote() for w in self.workers])

    def infos(self) -> list[dict]:
        return ray.get([w.info.remote() for w in self.workers])

    def update_weights(self, version: int, weights_ref) -> float:
        """Object-store sync: every worker loads the state dict behind `weights_ref`
        (an ObjectRef, or a state dict that is put once here). Returns seconds.
        Raises if any worker refused or reports another version afterwards."""
        t0 = time.perf_counter()
        if not isinstance(weights_ref, ray.ObjectRef):
            weights_ref = ray.put(weights_ref)
        got = get_all([w.update_weights.remote(version, [weights_ref]) for w in self.workers])
        self.check_versions(version, got)
        return time.perf_counter() - t0

    def load_files(self, version: int, files: list[str]) -> None:
        """Every worker loads `version` from safetensors files read on its own node."""
        self.check_versions(version, get_all([w.load_files.remote(version, files) for w in self.workers]))

    def revive(self, version: int, weights_ref) -> int:
        """Replace workers that died (ray.kill, SIGKILL, OOM, a lost node) with fresh
        engines holding `version` (`weights_ref`: that version's state dict; None
        for version 0, which a fresh engine already holds). Returns how many."""
        replaced = 0
        for k, w in enumerate(self.workers):
            try:
                ray.get(w.version.remote(), timeout=300)
                continue
            except ray.exceptions.RayActorError:
                pass
            new = self._start_worker(k)
            ray.get(new.info.remote())
            if version:
                if weights_ref is None:
                    raise StaleWeightsError(f"cannot revive generation worker {k}: no weights for version {version}")
                self.check_versions(version, [ray.get(new.update_weights.remote(version, [weights_ref]))])
            self.workers[k] = new
            replaced += 1
        return replaced

    def check_versions(self, version: int, got: list[int]) -> None:
        if any(v != version for v in got):
            raise StaleWeightsError(f"after sync to version {version} the workers report {got}")

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
