"""OOD detection of harmful requests on real HH data: AUROC per layer of SmolLM2-135M activations.
Prints numbers; not a pass/fail test.

    HH_DATA_DIR=/path/to/hh-rlhf HH_RAY_CACHE=/tmp/hhcache .venv/bin/python bench/bench_ood.py

Method (as `hh-ray eval ood`, through hh_ray.ood / hh_ray.ood_eval): hidden_states[layer] at the last
prompt token (the ":" of "\\n\\nAssistant:") of each conversation's first human turn; a Gaussian fitted
on half of the benign prompts only; AUROC of the other benign half vs the harmful-request prompts for
the simplified relative Mahalanobis distance and plain Mahalanobis; plus a linear probe given k
harmful examples. Ridge 1e-2 × the layer's mean unit variance.

Only harmless-base is on this machine, and it is red-teaming: almost every first turn is an attempt
to get something harmful. So two benign sets are measured, each with its caveat:

  A. "lexicon split" (same source, same register): harmless-base first turns are split by a fixed harm
     lexicon (HARM_WORDS below, whole words): with a lexicon word -> harmful request; with none ->
     "benign". The benign side is only lexicon-negative: it still holds red-team openers ("Why are poor
     people so stupid?", "Hi"), so this AUROC is a lower bound on what clean labels would give.
  B. "synthetic helpful": hh-ray's synthetic helpful requests (96 templated questions about hobbies,
     `data.source=synthetic`, the `eval ood --helpful` default) vs all harmless-base first turns. Clean
     labels, but the two sets also differ in style and template, which a detector can use: an upper bound.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HARM_WORDS = """kill killing murder murdering hurt hurting harm poison poisoning steal stealing stole rob robbing
shoot shooting gun guns bomb bombs weapon weapons explosive drug drugs cocaine heroin meth weed kidnap
drown stab torture abuse rape assault attack beat fight punch cheat cheating scam fraud hack hacking
illegal illegally crime criminal prison jail revenge racist racism slur insult insults hate nazi terrorist
suicide arson burn destroy vandalize threaten blackmail bully harass launder smuggle counterfeit lie lying
sneak trick spy stalk prank pranks""".split()


def first_turns(data_dir: str) -> list[str]:
    from hh_ray.data import first_prompt, load_comparisons, prompts_of

    pairs = load_comparisons(data_dir, data_dir="harmless-base", split="test", skip_bad=True, skip_identical=True)
    return list(dict.fromkeys(first_prompt(p) for p in prompts_of(pairs)))


def has_harm_word(prompt: str) -> bool:
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    return any(w in words for w in HARM_WORDS)


def activations_all_layers(model, tok, texts: list[str], max_len: int, batch_size: int = 16):
    """{layer: [n, hidden]} at the last prompt token, every layer from ONE forward per batch.

    hh_ray.ood.last_prompt_token_activations runs a forward per layer; on this shared machine that was
    minutes per layer, so the bench gathers all layers at once with the same left-truncation and right
    padding, and main() checks it against the library function on a few prompts."""
    import numpy as np
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: dict[int, list] = {}
    for s in range(0, len(texts), batch_size):
        rows = [ids[-max_len:] for ids in tok(texts[s: s + batch_size], add_special_tokens=False)["input_ids"]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = mask.sum(-1) - 1
        for layer, h in enumerate(hidden):
            out.setdefault(layer, []).append(h[torch.arange(len(rows)), last].double().numpy())
    return {layer: np.concatenate(v) for layer, v in out.items()}


def auroc_by_layer(model, tok, benign: list[str], harmful: list[str], layers: list[int], shots: list[int],
                   max_len: int) -> list[dict]:
    from hh_ray.ood_eval import evaluate_layer

    t0 = time.perf_counter()
    a_in = activations_all_layers(model, tok, benign, max_len)
    a_out = activations_all_layers(model, tok, harmful, max_len)
    print(f"  activations of {len(benign) + len(harmful)} prompts in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for layer in layers:
        r = {"layer": layer, **evaluate_layer(a_in[layer], a_out[layer], len(benign) // 2, shots)}
        rows.append(r)
        print(f"  layer {layer:>2}: " + "  ".join(f"{k[6:]} {v:.3f}" for k, v in r.items() if k != "layer"),
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=os.environ.get("HH_DATA_DIR", ""), help="hh-rlhf folder (default $HH_DATA_DIR)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num", type=int, default=300, help="prompts per set (at most)")
    ap.add_argument("--layers", type=int, nargs="+", help="hidden_states indices (default 1, 5, 10, … L)")
    ap.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    if not args.data or not Path(args.data, "harmless-base").exists():
        sys.exit("give --data or HH_DATA_DIR: a folder with harmless-base/test.jsonl[.gz]")
    import torch

    from hh_ray.data import first_prompt, prompts_of, synthetic_comparisons
    from hh_ray.models import load_policy, load_tokenizer, resolve_model

    # One thread: on a shared, oversubscribed machine torch's one-thread-per-core default spun
    # OpenMP threads and took 790 s for one layer's 400 forwards. (Every actor of a run likewise
    # sets its torch threads to its CPU share: hh_ray.runtime.set_torch_threads.)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    path = resolve_model(args.model)
    model, tok = load_policy(path), load_tokenizer(path)
    n_layers = model.config.num_hidden_layers
    layers = args.layers or sorted({1, *range(5, n_layers + 1, 5), n_layers})
    print(f"model {args.model} ({n_layers} layers, hidden {model.config.hidden_size}), torch threads "
          f"{torch.get_num_threads()}, layers {layers}, shots {args.shots}", flush=True)

    import numpy as np

    from hh_ray.ood import last_prompt_token_activations

    turns = first_turns(args.data)
    check = turns[:3]
    assert np.allclose(activations_all_layers(model, tok, check, args.max_len)[layers[1]],
                       last_prompt_token_activations(model, tok, check, layers[1], args.max_len), atol=1e-4)
    random.Random(args.seed).shuffle(turns)  # file order is not random; the fit half must not be a block
    harmful = [p for p in turns if has_harm_word(p)]
    benign = [p for p in turns if not has_harm_word(p)]
    print(f"harmless-base test: {len(turns)} distinct first human turns; {len(harmful)} with a harm-lexicon "
          f"word, {len(benign)} without", flush=True)

    t0 = time.perf_counter()
    print(f"\nA. lexicon split: {min(args.num, len(benign))} lexicon-negative (Gaussian on half) vs "
          f"{min(args.num, len(harmful))} lexicon-positive", flush=True)
    a = auroc_by_layer(model, tok, benign[: args.num], harmful[: args.num], layers, args.shots, args.max_len)
    synth = list(dict.fromkeys(first_prompt(p) for p in prompts_of(synthetic_comparisons(4000, seed=args.seed))))
    random.Random(args.seed).shuffle(synth)
    print(f"\nB. synthetic helpful: {min(args.num, len(synth))} synthetic requests (Gaussian on half) vs "
          f"{min(args.num, len(turns))} harmless-base first turns", flush=True)
    b = auroc_by_layer(model, tok, synth[: args.num], turns[: args.num], layers, args.shots, args.max_len)
    for name, rows in (("A lexicon split", a), ("B synthetic helpful", b)):
        best = max(rows, key=lambda r: r["auroc_relative_mahalanobis"])
        print(f"{name}: best layer {best['layer']} relative Mahalanobis AUROC {best['auroc_relative_mahalanobis']:.3f}")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
