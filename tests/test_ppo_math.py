"""PPO/GAE/KL math against numbers worked out by hand."""

import math

import pytest
import torch

from hh_ray import ppo


def test_token_logprobs_matches_log_softmax_and_chunks():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(ppo.token_logprobs(logits, labels, chunk=3), want, atol=1e-6)


def test_chunked_logprobs_and_entropy_give_the_unchunked_gradients():
    torch.manual_seed(0)
    labels, weight = torch.randint(0, 11, (2, 7)), torch.randn(2, 7)

    def grad(f):
        logits = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (f(logits) * weight).sum().backward()
        return logits.grad

    full = lambda lg: torch.log_softmax(lg, -1).gather(-1, labels[..., None]).squeeze(-1)  # noqa: E731
    assert torch.allclose(grad(lambda lg: ppo.token_logprobs(lg, labels, chunk=3)), grad(full), atol=1e-6)
    entropy = lambda lg: -(torch.softmax(lg, -1) * torch.log_softmax(lg, -1)).sum(-1)  # noqa: E731
    assert torch.allclose(grad(lambda lg: ppo.entropy_from_logits(lg, chunk=3)), grad(entropy), atol=1e-6)


def test_entropy_of_uniform_is_log_v():
    ent = ppo.entropy_from_logits(torch.zeros(1, 2, 8))
    assert torch.allclose(ent, torch.full((1, 2), math.log(8)))


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]])
    k1 = ppo.kl_penalty(logp, ref, "k1")
    assert torch.allclose(k1, torch.tensor([[math.log(2), -math.log(2)]]))
    k3 = ppo.kl_penalty(logp, ref, "k3")  # r = ref/p: 0.5 -> -0.5+ln2 ; 2 -> 1-ln2
    assert torch.allclose(k3, torch.tensor([[-0.5 + math.log(2), 1 - math.log(2)]]), atol=1e-6)
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo.kl_penalty(logp, ref, "k2")


def test_rewards_put_pm_score_on_last_response_token():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    kl = torch.tensor([[9.0, 1.0, 2.0, 9.0], [9.0, 9.0, 1.0, -1.0]])
    r = ppo.rewards(torch.tensor([3.0, -1.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[0, -0.1, 2.8, 0], [0, 0, -0.1, -0.9]]))


def test_gae_by_hand():
    # one response of 3 tokens after a 1-token prompt, gamma=1, lambda=0.5
    r = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    v = torch.tensor([[7.0, 0.5, 0.25, 0.5, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = ppo.gae(r, v, mask, gamma=1.0, lam=0.5)
    # t=3: delta = 1 + 0 - 0.5 = 0.5               A3 = 0.5
    # t=2: delta = 0 + 0.5 - 0.25 = 0.25            A2 = 0.25 + 0.5*0.5 = 0.5
    # t=1: delta = 0 + 0.25 - 0.5 = -0.25           A1 = -0.25 + 0.5*0.5 = 0.0
    assert torch.allclose(adv, torch.tensor([[0, 0.0, 0.5, 0.5, 0]]))
    assert torch.allclose(ret, torch.tensor([[0, 0.5, 0.75, 1.0, 0]]))


def test_gae_lambda_one_gives_monte_carlo_returns():
    r = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    v = torch.tensor([[0.0, 5.0, -2.0, 1.0]])
    mask = torch.ones(1, 4)
    _, ret = ppo.gae(r, v, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[6.0, 6.0, 5.0, 3.0]]))


def test_token_mean_vs_seq_mean():
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    assert ppo.masked_mean(x, mask, "token_mean").item() == pytest.approx(9 / 5)
    assert ppo.masked_mean(x, mask, "seq_mean").item() == pytest.approx(3.0)


def test_whiten():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    w = ppo.whiten(x, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)


def test_ppo_loss_clips_by_hand():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo.ppo_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 1: min(1.5, 1.2)*1 = 1.2 ; token 2: min(0.5, 0.8) = 0.5 ; token 3: min(-1.1, -1.1) = -1.1
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1) / 3, abs=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() > 0


def test_value_loss_clips_by_hand():
    v = torch.tensor([[2.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0]])
    # token 1: max((2-1)^2, (0.2-1)^2) = 1 ; token 2: max(1, 1) = 1
    assert ppo.value_loss(v, old, ret, torch.ones(1, 2), clip_eps=0.2).item() == pytest.approx(0.5)
    v = torch.tensor([[0.5, 0.0]])  # clipped 0.2: max(0.25, 0.64)=0.64 ; 1
    assert ppo.value_loss(v, old, ret, torch.ones(1, 2), clip_eps=0.2).item() == pytest.approx(0.5 * (0.64 + 1) / 2)


def test_last_token_mask_and_shift():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]])
    assert ppo.last_token_mask(mask).tolist() == [[0, 0, 1, 0], [0, 0, 0, 0]]
    assert ppo.shift_right(torch.tensor([[1.0, 2.0, 3.0]])).tolist() == [[0.0, 1.0, 2.0]]


def test_lr_schedules():
    assert ppo.lr_factor(0, 10, "constant") == 1.0
    assert ppo.lr_factor(5, 10, "linear") == pytest.approx(0.5)
    assert ppo.lr_factor(10, 10, "cosine") == pytest.approx(0.0)
    assert ppo.lr_factor(0, 10, "constant", warmup=4) == pytest.approx(0.25)


def test_policy_logprobs_alignment():
    """Column t of policy_logprobs is log p(x_t | x_<t), computed independently here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=1, num_key_value_heads=1, head_dim=32))
    ids = torch.tensor([[3, 5, 7, 9]])
    lp = ppo.policy_logprobs(m, ids, torch.ones_like(ids), temperature=2.0)
    logits = m(ids[:, :3]).logits[0, -1] / 2.0
    assert lp[0, 0] == 0
    assert lp[0, 3].item() == pytest.approx(torch.log_softmax(logits, -1)[9].item(), abs=1e-5)


def test_bf16_linear_weights_give_the_autocast_scores(tiny_model):
    """Under bf16 autocast the PM service stores its Linear weights in bf16: the scores
    are the fp32 model's under autocast, bit for bit; embeddings, norms and a weight
    tied to the embeddings stay fp32."""
    from hh_ray.models import autocast, load_policy, load_scalar_head_model, pm_scores, store_linear_weights_in_bf16

    torch.manual_seed(0)
    pm, _ = load_scalar_head_model(tiny_model)
    pm.eval()
    ids = torch.randint(0, pm.config.vocab_size, (3, 10))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    with torch.no_grad(), autocast("bfloat16", "cpu"):
        want = pm_scores(pm, ids, attn)
    store_linear_weights_in_bf16(pm)
    with torch.no_grad(), autocast("bfloat16", "cpu"):
        assert torch.equal(pm_scores(pm, ids, attn), want)
    kinds = {(type(m).__name__, m.weight.dtype) for m in pm.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    assert ("Linear", torch.bfloat16) in kinds and ("Linear", torch.float32) not in kinds
    assert {d for k, d in kinds if k != "Linear"} == {torch.float32}

    lm = load_policy(tiny_model)
    lm.lm_head.weight = lm.model.embed_tokens.weight  # tied, as in SmolLM2
    store_linear_weights_in_bf16(lm)
    assert lm.lm_head.weight.dtype == torch.float32 and lm.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_response_logits_match_the_full_forward(tiny_model):
    """Log-probs, entropies and gradients from the output layer run at response
    positions only equal those of the full forward; a model whose logits are more
    than output_layer(hidden) is caught by the learner's probe and gets the full path."""
    from hh_ray.models import load_policy
    from learners.ppo_learner import PolicyModel

    torch.manual_seed(0)
    lm = load_policy(tiny_model)
    ids = torch.randint(0, lm.config.vocab_size, (3, 12))
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0  # right padding
    mask = torch.zeros_like(ids)
    mask[0, 4:12], mask[1, 7:10], mask[2, 5:9] = 1, 1, 1
    model = PolicyModel(lm)
    assert model.split
    full_logp, full_ent = ppo.policy_logprobs(lm, ids, attn, 0.7, with_entropy=True)
    (full_logp * mask).sum().backward()
    want = lm.lm_head.weight.grad.clone()
    lm.zero_grad()
    logp, ent = ppo.response_logprobs(model(ids, attn, mask), ids, mask, 0.7, with_entropy=True)
    (logp * mask).sum().backward()
    assert torch.allclose(logp, full_logp * mask, atol=1e-5)
    assert torch.allclose(ent, full_ent * mask, atol=1e-4)
    assert torch.allclose(lm.lm_head.weight.grad, want, atol=1e-5)
    assert (logp[mask == 0] == 0).all()
    none = torch.zeros_like(mask)  # a micro-batch without response tokens still backpropagates
    logp, ent = ppo.response_logprobs(model(ids, attn, none), ids, none, 0.7, with_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == ent.shape == ids.shape and not logp.any() and not ent.any()

    class Scaled(torch.nn.Module):  # logits scaled after the output layer, as some families do
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = out.logits * 0.5
            return out

        def get_decoder(self):
            return self.inner.get_decoder()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

    scaled = PolicyModel(Scaled(lm))
    assert not scaled.split
    with torch.no_grad():
        got = ppo.response_logprobs(scaled(ids, attn, mask), ids, mask)
        assert torch.allclose(got, ppo.policy_logprobs(Scaled(lm), ids, attn) * mask, atol=1e-5)


def test_micro_batches_group_rows_of_like_length():
    """Each chosen row in exactly one micro-batch, rows of like length together, and
    every micro-batch trimmed to its longest row."""
    from hh_ray.rollout import RolloutBatch
    from learners.ppo_learner import micro_batches

    lengths = [9, 3, 8, 2, 7, 4]  # prompt of 1 token + a response of length - 1
    batch = RolloutBatch.from_samples([[1]] * 6, [[5] * (n - 1) for n in lengths], [[0.0] * (n - 1) for n in lengths],
                                      [0] * 6, [""] * 6, [""] * 6, [""] * 6, pad_id=0)
    rows = [0, 1, 2, 3, 5]  # row 4 is another minibatch's
    parts = list(micro_batches(batch, rows, 2))
    assert [part for part, _, _ in parts] == [[3, 1], [5, 2], [0]]
    assert [w for _, _, w in parts] == [3, 8, 9]
    for part, mb, w in parts:
        assert torch.equal(mb.input_ids, batch.input_ids[part]) and mb.attention_mask[:, w:].sum() == 0


def test_eager_attention_gives_the_sdpa_log_probs_under_bf16(tiny_model):
    """The learner runs eager attention under bf16 autocast on CPU (faster backward):
    the same log-probs as sdpa, right padding included, to bf16's precision."""
    from hh_ray.models import autocast, load_policy

    torch.manual_seed(0)
    lm = load_policy(tiny_model)
    ids = torch.randint(0, lm.config.vocab_size, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, 8:] = 0
    out = {}
    for kind in ("sdpa", "eager"):
        lm.set_attn_implementation(kind)
        with torch.no_grad(), autocast("bfloat16", "cpu"):
            out[kind] = ppo.policy_logprobs(lm, ids, attn) * attn
    assert torch.allclose(out["eager"], out["sdpa"], atol=0.01)
    assert not torch.equal(out["eager"], torch.zeros_like(out["eager"]))


def test_make_experience_by_hand():
    """One response of 2 tokens after a 1-token prompt, lambda_KL = 0.5, gamma = 1, lambda = 1."""
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0]])      # k1 per token: 0.5, -1.0 (sum -0.5)
    values = torch.tensor([[9.0, 0.25, 0.5]])    # column 0 is the prompt: ignored
    mask = torch.tensor([[0, 1, 1]])
    exp = ppo.make_experience(torch.tensor([2.0]), logp, ref, values, mask, kl_coef=0.5, lam=1.0,
                              whiten_advantages=False)
    # rewards: -0.5 * 0.5 = -0.25 ; -0.5 * -1.0 + 2.0 (PM on the last token) = 2.5
    assert torch.allclose(exp.rewards, torch.tensor([[0.0, -0.25, 2.5]]))
    # returns (lambda = 1, gamma = 1): 2.25, 2.5 ; advantages = returns - values
    assert torch.allclose(exp.returns, torch.tensor([[0.0, 2.25, 2.5]]))
    assert torch.allclose(exp.advantages, torch.tensor([[0.0, 2.0, 2.0]]))
    assert exp.kl_k1.item() == pytest.approx(-0.5) and exp.reward_total.item() == pytest.approx(2.25)

    # k3 in the penalty: the rewards change, the logged KL stays k1
    k3 = ppo.make_experience(torch.tensor([2.0]), logp, ref, values, mask, kl_coef=0.5, kl_estimator="k3",
                             lam=1.0, whiten_advantages=False)
    # k3 = exp(-d) - 1 + d: d = 0.5 -> e^-0.5 - 0.5 ; d = -1 -> e - 2
    assert torch.allclose(k3.kl[0, 1:], torch.tensor([math.exp(-0.5) - 0.5, math.e - 2]), atol=1e-6)
    assert k3.kl_k1.item() == pytest.approx(-0.5)
    assert k3.reward_total.item() == pytest.approx(2.0 - 0.5 * (math.exp(-0.5) - 0.5 + math.e - 2), abs=1e-6)
    with pytest.raises(ValueError, match="ppo.advantage_estimator"):
        ppo.make_experience(torch.tensor([2.0]), logp, ref, values, mask, kl_coef=0.5, advantage_estimator="nope")


def test_whiten_takes_the_whole_batch_statistics_through_all_reduce():
    """Two data-parallel shards whitened with summed statistics equal the whole batch whitened."""
    x = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    whole = ppo.whiten(x, mask)
    shards = [(x[:1], mask[:1]), (x[1:], mask[1:])]
    sums = [torch.stack([(s * m).sum(), (s * s * m).sum(), m.sum()]).double() for s, m in shards]
    total = sums[0] + sums[1]
    got = torch.cat([ppo.whiten(s, m, all_reduce_sum=lambda _: total) for s, m in shards])
    assert torch.allclose(got, whole, atol=1e-6)
    assert torch.allclose(whole, torch.tensor([[-1.2247, 0.0], [1.2247, 0.0]]), atol=1e-4)  # mean 2, std sqrt(2/3)


def test_estimator_registries_drive_the_config_choices():
    from hh_ray.config import CHOICES, ConfigError, load_config
    from hh_ray.estimators import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS

    assert CHOICES["ppo.kl_estimator"] == tuple(KL_ESTIMATORS) == ("k1", "k3")
    assert CHOICES["ppo.advantage_estimator"] == tuple(ADVANTAGE_ESTIMATORS) == (
        "gae", "grpo", "grpo_no_std", "rloo", "reinforce_pp")
    with pytest.raises(ConfigError, match="'k1', 'k3'"):
        load_config(None, {"ppo.kl_estimator": "k2"})


# Two prompts x 2 samples; responses of 2, 1, 2, 1 tokens (column 0 is the prompt).
GROUP_MASK = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 0]])
GROUPS = torch.tensor([0, 0, 1, 1])


def _outcome_rewards(scores):
    """Per-token rewards: each sample's outcome on its last response token, as ppo.rewards puts it."""
    r = torch.zeros(4, 3)
    for i, s in enumerate(scores):
        r[i, int(GROUP_MASK[i].nonzero().max())] = s
    return r


def test_grpo_and_rloo_by_hand():
    from hh_ray.estimators import ADVANTAGE_ESTIMATORS as E

    r = _outcome_rewards([1.0, 3.0, 2.0, 2.0])
    zeros = torch.zeros(4, 3)
    # group 0: mean 2, std 1 -> -1, +1; group 1: equal rewards -> 0, 0
    adv, _ = E["grpo"](r, zeros, GROUP_MASK, GROUPS)
    assert torch.allclose(adv, torch.tensor([[0, -1, -1], [0, 1, 0], [0, 0, 0], [0, 0, 0]]).float(), atol=1e-5)
    adv, _ = E["grpo_no_std"](_outcome_rewards([1.0, 5.0, 2.0, 4.0]), zeros, GROUP_MASK, GROUPS)
    assert torch.allclose(adv, torch.tensor([[0, -2, -2], [0, 2, 0], [0, -1, -1], [0, 1, 0]]).float())
    # leave-one-out with n = 2: R_i - R_other
    adv, _ = E["rloo"](_outcome_rewards([1.0, 5.0, 2.0, 4.0]), zeros, GROUP_MASK, GROUPS)
    assert torch.allclose(adv, torch.tensor([[0, -4, -4], [0, 4, 0], [0, -2, -2], [0, 2, 0]]).float())
    # a sample alone in its group has nothing to compare with
    adv, _ = E["rloo"](_outcome_rewards([1.0, 5.0, 2.0, 4.0]), zeros, GROUP_MASK, torch.tensor([0, 1, 2, 3]))
    assert adv.abs().sum() == 0
    # three samples: mean of the others
    m3, g3 = torch.ones(3, 1), torch.zeros(3, dtype=torch.long)
    adv, _ = E["rloo"](torch.tensor([[3.0], [6.0], [0.0]]), torch.zeros(3, 1), m3, g3)
    assert torch.allclose(adv.squeeze(1), torch.tensor([3.0 - 3.0, 6.0 - 1.5, 0.0 - 4.5]))


def test_reinforce_pp_returns_by_hand_and_make_experience_settings():
    from hh_ray.estimators import ADVANTAGE_ESTIMATORS as E

    # per-token rewards with a KL penalty on each response token, the outcome on the last
    r = torch.tensor([[9.0, -0.1, 1.9], [9.0, 0.8, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    ret, _ = E["reinforce_pp"](r, torch.zeros(2, 3), mask)
    assert torch.allclose(ret, torch.tensor([[0.0, 1.8, 1.9], [0.0, 0.8, 0.0]]))
    assert ret.shape == r.shape and E["reinforce_pp"].whiten and not E["grpo"].whiten
    assert E["gae"].critic and not any(E[k].critic for k in ("grpo", "grpo_no_std", "rloo", "reinforce_pp"))

    # make_experience: kl_in=loss leaves the KL out of the reward; grpo is not whitened again
    logp = torch.tensor([[0.0, -1.0, -1.0], [0.0, -1.0, 0.0], [0.0, -2.0, -2.0], [0.0, -1.0, 0.0]])
    ref = logp - 0.5 * GROUP_MASK
    score = torch.tensor([1.0, 3.0, 2.0, 2.0])
    common = dict(kl_coef=0.1, advantage_estimator="grpo", groups=GROUPS)
    in_reward = ppo.make_experience(score, logp, ref, torch.zeros(4, 3), GROUP_MASK, **common)
    in_loss = ppo.make_experience(score, logp, ref, torch.zeros(4, 3), GROUP_MASK, kl_in="loss", **common)
    assert torch.allclose(in_loss.reward_total, score) and torch.allclose(in_reward.reward_total,
                                                                           score - 0.1 * 0.5 * GROUP_MASK.sum(1))
    assert torch.allclose(in_loss.advantages[:, 1], torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(in_loss.kl_k1, in_reward.kl_k1)  # the logged KL does not depend on where it is paid
    # the KL loss term is k3 of the current log-probs against pi0, differentiable
    cur = logp.clone().requires_grad_()
    loss = ppo.kl_loss(cur, ref, GROUP_MASK)
    loss.backward()
    assert loss.item() == pytest.approx(math.expm1(-0.5) + 0.5, rel=1e-5) and cur.grad.abs().sum() > 0


def test_learner_shards_hold_whole_groups_of_equal_size():
    from hh_ray.rollout import RolloutBatch

    def batch(groups):
        b = len(groups)
        return RolloutBatch(torch.zeros(b, 2, dtype=torch.long), torch.ones(b, 2), torch.ones(b, 2), torch.zeros(b, 2),
                            torch.zeros(b, dtype=torch.long), [""] * b, [""] * b, ["stop"] * b,
                            group=None if groups is None else torch.tensor(groups))

    one_each = batch([0, 1, 2, 3, 4, 5])
    one_each.group = None
    assert one_each.shard_rows(0, 2) == [0, 2, 4] and one_each.shard_rows(1, 2) == [1, 3, 5]  # as before groups
    grouped = batch([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    shards = [grouped.shard_rows(r, 2) for r in range(2)]
    assert shards == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11]]
    assert sorted(shards[0] + shards[1]) == list(range(12))
    kept = grouped.select(shards[1])  # a shard keeps its group ids, so its estimator sees whole groups
    assert kept.groups().tolist() == [1, 1, 1, 3, 3, 3]


def test_tokens_before_stop_by_hand():
    """vLLM keeps the tokens up to the one that completed the stop string; the response keeps
    only those wholly before it, a token straddling the cut going with the stop string."""
    from hh_ray.rollout import tokens_before_stop

    pieces = {1: "Sure", 2: ", glad", 3: " to.\n", 4: "\nHum", 5: "an:"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    ids = [1, 2, 3, 4, 5]
    assert tokens_before_stop(ids, "Sure, glad to.", decode) == 2  # " to.\n" straddles "\n\nHuman:"
    assert tokens_before_stop(ids, "Sure, glad to.\n", decode) == 3
    assert tokens_before_stop(ids, "", decode) == 0
    assert tokens_before_stop(ids, decode(ids), decode) == 5


@pytest.mark.parametrize("attention, precision", [("sdpa", "none"), ("eager", "bfloat16")])
def test_selective_recompute_gives_the_same_gradients_and_reruns_no_matmul(tiny_model, attention, precision):
    """model.gradient_checkpointing 'selective' keeps the matmul and attention outputs and runs the
    elementwise ops again in backward: gradients equal to no recompute's, bit for bit (the same
    ops on the same inputs); in backward as many matmuls as without recompute ('full' runs each
    layer's forward matmuls again), and the norms' rsqrt and the SiLU again, which no recompute
    does not. Counted as the kernels run (a dispatch mode under the recompute's cache)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from hh_ray.models import autocast, enable_checkpointing, load_policy

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def backward(kind):
        torch.manual_seed(0)
        lm = load_policy(tiny_model)
        lm.set_attn_implementation(attention)
        enable_checkpointing(lm, kind)
        lm.train()
        ids = torch.randint(0, lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        with autocast(precision, "cpu"):
            loss = ppo.policy_logprobs(lm, ids, torch.ones_like(ids)).sum()
        with Ops() as ops:
            loss.backward()
        return [p.grad for p in lm.parameters()], ops.count

    (plain, plain_ops), (selective, selective_ops), (_, full_ops) = map(backward, ("none", "selective", "full"))
    assert all(torch.equal(a, b) for a, b in zip(plain, selective))
    matmuls = lambda ops: ops["mm"] + ops["bmm"] + ops["addmm"]  # noqa: E731
    assert matmuls(selective_ops) == matmuls(plain_ops) < matmuls(full_ops)
    for op in ("rsqrt", "silu"):
        assert plain_ops[op] == 0 and selective_ops[op] == full_ops[op] > 0
