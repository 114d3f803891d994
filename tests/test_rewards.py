"""Quality / semantic rewards, the PiscesRewards module, reward fusion and gradient diagnostics."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from pisces_fast.rewards import (
    BlipVideoBackbone,
    InternVideo2,
    InternVideo2Backbone,
    InternVideo2Config,
    OTMap,
    OTMapConfig,
    PiscesRewards,
    POTConfig,
    build_word_tokenizer,
    fuse_rewards,
    gradient_cosine,
    group_ids_from_prompts,
    group_normalize,
    grpo_advantages,
    quality_reward,
    reward_diagnostics,
    semantic_reward,
    tiny_blip_config,
)

WORDS = "a red blue green circle square triangle moving left right up down".split()
PROMPTS = ["a red circle moving left", "a blue square moving up"]
POT = POTConfig(backend="reference")


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(params=["internvideo2", "blip"])
def backbone(request, tokenizer):
    torch.manual_seed(0)
    if request.param == "internvideo2":
        return InternVideo2Backbone(InternVideo2(InternVideo2Config.tiny(vocab_size=len(tokenizer))), tokenizer)
    return BlipVideoBackbone(BlipForImageTextRetrieval(tiny_blip_config(len(tokenizer))), tokenizer, num_frames=3)


def random_map(dim, seed=0):
    """An OTMap with random (non-identity) weights, standing in for a fitted one."""
    torch.manual_seed(seed)
    m = OTMap(OTMapConfig(dim=dim, hidden=16))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m.eval().requires_grad_(False)


def videos(b=2, requires_grad=True):
    return torch.rand(b, 6, 3, 36, 36).requires_grad_(requires_grad)


def test_pisces_rewards_interface_and_gradients(backbone):
    rewards = PiscesRewards(backbone, random_map(backbone.embed_dim), pot=POT)
    video = videos()
    out = rewards(video, PROMPTS)
    assert set(out) == {"quality", "semantic"}
    assert out["quality"].shape == (2,) and out["semantic"].shape == (2,)
    assert bool((out["quality"].abs() <= 1 + 1e-6).all()) and bool(((out["semantic"] > 0) & (out["semantic"] < 1)).all())
    for name in ("quality", "semantic"):
        (grad,) = torch.autograd.grad(out[name].sum(), video, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # The reward model is frozen: no parameter collects gradients, and it stays in eval mode.
    assert not any(p.requires_grad for p in rewards.parameters())
    rewards.train()
    assert not rewards.training and not rewards.backbone.training


def test_reward_definitions(backbone):
    """Eq. 2 and Eq. 4 as the module computes them, and their ablations."""
    ot_map = random_map(backbone.embed_dim)
    video = videos(requires_grad=False)
    text, vid = backbone.encode_text(PROMPTS), backbone.encode_video(video)
    # Quality: cos(T(y), x); without the map the plain cosine of the joint embeddings.
    expected = F.cosine_similarity(ot_map(text.embed), vid.embed, dim=-1)
    torch.testing.assert_close(quality_reward(text.embed, vid.embed, ot_map), expected)
    plain = (text.embed * vid.embed).sum(-1)
    torch.testing.assert_close(quality_reward(text.embed, vid.embed), plain)
    assert (expected - plain).abs().max() > 1e-4
    # Semantic: softmax(VTM)[:, 1] with and without the OT-fused attention.
    vanilla = torch.softmax(backbone.match_logits(text, vid), -1)[:, 1]
    torch.testing.assert_close(semantic_reward(backbone, text, vid, None), vanilla)
    with_pot = semantic_reward(backbone, text, vid, POT)
    assert (with_pot - vanilla).abs().max() > 1e-7
    # The module wires the options to these functions.
    full = PiscesRewards(backbone, ot_map, pot=POT)(video, PROMPTS)
    torch.testing.assert_close(full["quality"], expected)
    torch.testing.assert_close(full["semantic"], with_pot)
    ablated = PiscesRewards(backbone, ot_map, use_ot_map=False, use_pot=False)(video, PROMPTS)
    torch.testing.assert_close(ablated["quality"], plain)
    torch.testing.assert_close(ablated["semantic"], vanilla)


def test_zero_weight_skips_a_reward(backbone):
    video = videos()
    only_quality = PiscesRewards(backbone, use_ot_map=False, weights={"semantic": 0})
    out = only_quality(video, PROMPTS)
    assert torch.equal(out["semantic"], torch.zeros(2)) and not out["semantic"].requires_grad
    assert out["quality"].requires_grad


def test_pisces_rewards_bad_inputs(backbone):
    with pytest.raises(ValueError, match="needs an ot_map"):
        PiscesRewards(backbone)
    with pytest.raises(ValueError, match="joint space"):
        PiscesRewards(backbone, random_map(backbone.embed_dim + 1))
    with pytest.raises(ValueError, match="unknown rewards"):
        PiscesRewards(backbone, use_ot_map=False, weights={"aesthetic": 1.0})
    with pytest.raises(ValueError, match="at least one reward weight"):
        PiscesRewards(backbone, use_ot_map=False, weights={"quality": 0, "semantic": 0})
    rewards = PiscesRewards(backbone, use_ot_map=False, pot=POT)
    with pytest.raises(ValueError, match="one prompt per video"):
        rewards(videos(), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"\[-1, 1\] video"):
        rewards(videos(requires_grad=False) * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        rewards(torch.rand(2, 3, 36, 36), PROMPTS)
    with pytest.raises(ValueError, match="same shape"):
        quality_reward(torch.randn(2, 4), torch.randn(3, 4))


# -- fusion ---------------------------------------------------------------------------------------
def test_equal_fusion():
    r = {"quality": torch.tensor([0.5, 0.7]), "semantic": torch.tensor([0.9, 0.1])}
    torch.testing.assert_close(fuse_rewards(r), torch.tensor([1.4, 0.8]))
    torch.testing.assert_close(fuse_rewards(r, {"quality": 1.0, "semantic": 2.0}), torch.tensor([2.3, 0.9]))
    # weights name exactly the fused rewards: a reward left out (or with weight 0) does not count
    torch.testing.assert_close(fuse_rewards(r, {"semantic": 2.0}), torch.tensor([1.8, 0.2]))
    torch.testing.assert_close(fuse_rewards(r, {"quality": 0.0, "semantic": 1.0}), torch.tensor([0.9, 0.1]))


def test_group_fusion_hand_checked():
    prompts = ["cat", "cat", "cat", "dog", "dog", "fish"]
    ids = group_ids_from_prompts(prompts)
    assert ids.tolist() == [0, 0, 0, 1, 1, 2]
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 4.0])
    std0 = (2.0 / 3.0) ** 0.5  # population std of (1, 2, 3)
    expected = torch.tensor([-1 / std0, 0.0, 1 / std0, -1.0, 1.0, 0.0])  # "fish" alone: 0
    torch.testing.assert_close(group_normalize(r, ids, eps=1e-12), expected)
    both = fuse_rewards({"quality": r, "semantic": 2 * r}, {"quality": 1.0, "semantic": 0.5}, "group", ids, eps=1e-12)
    torch.testing.assert_close(both, 1.5 * expected)  # each reward normalised on its own, then weighted and summed
    with pytest.raises(ValueError, match="needs group_ids"):
        fuse_rewards({"quality": r}, None, "group")


def test_group_statistics_are_detached_and_lone_samples_get_no_gradient():
    r = torch.tensor([1.0, 2.0, 4.0, 3.0], requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1])
    (g_detached,) = torch.autograd.grad(group_normalize(r, ids).sum(), r)
    (g_full,) = torch.autograd.grad(group_normalize(r, ids, detach_stats=False).sum(), r)
    std = float(r.detach()[:3].std(unbiased=False))
    # ∇r_i / std_g: the adaptive weight; the lone sample of group 1 has nothing to compare with (0, not 1/eps)
    torch.testing.assert_close(g_detached, torch.tensor([1 / (std + 1e-6)] * 3 + [0.0]))
    assert g_full.abs().max() < 1e-5  # normalised rewards sum to 0: nothing to learn from


def test_grpo_advantages_normalise_once():
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    q = torch.tensor([0.2, 0.4, 0.9, 0.1, 0.1, 0.7], dtype=torch.float64)
    s = torch.tensor([0.5, 0.3, 0.1, 0.9, 0.6, 0.3], dtype=torch.float64)
    w = {"quality": 1.0, "semantic": 2.0}

    def norm(x):  # by hand: population std per prompt group of 3
        g = x.view(2, 3)
        return ((g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + 1e-6)).reshape(-1)

    adv, fused = grpo_advantages({"quality": q, "semantic": s}, w, "group", ids)
    torch.testing.assert_close(adv, norm(q) + 2 * norm(s))  # the group fusion IS the advantage: no second pass
    torch.testing.assert_close(fused, adv)
    assert not torch.allclose(adv, norm(adv))  # a second normalisation would have changed it
    adv_eq, fused_eq = grpo_advantages({"quality": q, "semantic": s}, w, "equal", ids, clip=1.0)
    torch.testing.assert_close(fused_eq, q + 2 * s)
    torch.testing.assert_close(adv_eq, norm(q + 2 * s).clamp(-1, 1))


def test_fusion_bad_inputs():
    with pytest.raises(ValueError, match="mode must be one of"):
        fuse_rewards({"quality": torch.ones(2)}, mode="max")
    with pytest.raises(ValueError, match="same shape"):
        fuse_rewards({"quality": torch.ones(2), "semantic": torch.ones(3)})
    # a non-finite reward propagates (the trainer stops on the non-finite loss, on every rank)
    assert fuse_rewards({"quality": torch.tensor([1.0, float("nan")])}).isnan().tolist() == [False, True]
    with pytest.raises(ValueError, match="did not return"):
        fuse_rewards({"quality": torch.ones(2)}, {"semantic": 1.0})
    with pytest.raises(ValueError, match="group_ids must be an integer tensor of shape"):
        fuse_rewards({"quality": torch.ones(2)}, None, "group", torch.zeros(3, dtype=torch.long))


# -- gradient diagnostics (Figure 8) -----------------------------------------------------------------
def test_gradient_cosine_hand_checked():
    x = torch.randn(2, 3, requires_grad=True)
    w1 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    w2 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    q, s = (w1 * x).sum(1), (w2 * x).sum(1)  # ∇q_i = w1[i], ∇s_i = w2[i]
    out = gradient_cosine(q, s, x)
    torch.testing.assert_close(out["grad_cosine"], torch.tensor([0.0, 2 ** -0.5]))
    torch.testing.assert_close(out["grad_norm_quality"], torch.tensor([1.0, 2 ** 0.5]))
    (q + s).sum().backward()  # the graph was kept for the training step
    with pytest.raises(ValueError, match="requires_grad"):
        gradient_cosine(q.detach(), s.detach(), torch.randn(2, 3))


def test_reward_diagnostics(backbone):
    rewards = PiscesRewards(backbone, random_map(backbone.embed_dim), pot=POT)
    video = videos(requires_grad=False)
    out = reward_diagnostics(rewards, video, PROMPTS)
    assert set(out) == {"quality", "semantic", "grad_cosine", "grad_norm_quality", "grad_norm_semantic"}
    assert all(v.shape == (2,) and torch.isfinite(v).all() and not v.requires_grad for v in out.values())
    assert bool((out["grad_cosine"].abs() <= 1 + 1e-6).all()) and bool((out["grad_norm_semantic"] > 0).all())
    torch.testing.assert_close(out["quality"], rewards(video, PROMPTS)["quality"].detach())
