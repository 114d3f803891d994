"""Training math checked against diffusers' schedulers and closed forms (fast, no models)."""
import math

import pytest
import torch

from pisces_fast.training import diffusion_math as dm
from pisces_fast.training.distortions import (DistortionCurriculum, apply_distortion, gaussian_blur, max_shuffle_block,
                                              shuffle_blocks, validate_curriculum)
from pisces_fast.training.toy_rewards import ToyColorReward


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.3])
def test_ddim_step_matches_diffusers(eta):
    s = ddim()
    s.set_timesteps(10)
    torch.manual_seed(0)
    x, eps, noise = torch.randn(3, 2, 4, 3, 5, 5).unbind(0)
    ab = s.alphas_cumprod
    for t in s.timesteps[:-1]:
        ref = s.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        prev = t - 100
        mean, std = dm.ddim_sde_mean_std(ab[t], ab[prev], x, eps, eta)
        torch.testing.assert_close(mean + std * noise, ref, rtol=1e-5, atol=1e-5)
        if eta == 0:
            torch.testing.assert_close(dm.ddim_step(ab[t], ab[prev], x, eps), ref, rtol=1e-5, atol=1e-5)


def test_flow_euler_and_sde_limit_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(6)
    torch.manual_seed(0)
    x, v = torch.randn(2, 1, 4, 2, 4, 4).unbind(0)
    sig = s.sigmas
    s.set_timesteps(6)
    for i, t in enumerate(s.timesteps):
        ref = s.step(v, t, x).prev_sample
        torch.testing.assert_close(x + (sig[i + 1] - sig[i]) * v, ref)
        # With a vanishing noise level the SDE mean is the ODE step and the std goes to 0.
        mean, std = dm.flow_sde_mean_std(x, v, sig[i], sig[i + 1], 1e-6, float(sig[1]))
        torch.testing.assert_close(mean, ref, rtol=1e-4, atol=1e-4)
        assert float(std) < 1e-5


def test_gaussian_logprob_is_elementwise_mean_of_normal_logpdf():
    torch.manual_seed(0)
    mean, x = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    std = torch.full((2, 1, 1), 0.7)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(dm.gaussian_logprob(x, mean, std), ref)


def test_lcm_boundary_conditions_and_pseudo_huber():
    c_skip, c_out = dm.lcm_boundary_scalings(torch.tensor([0.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0  # identity at t = 0
    assert c_skip[1] < 1e-6 and abs(float(c_out[1]) - 1) < 1e-6
    p, t = torch.zeros(4), torch.tensor([0.0, 1.0, -2.0, 0.5])
    ref = ((t ** 2 + 1e-6).sqrt() - 1e-3).mean()
    torch.testing.assert_close(dm.pseudo_huber(p, t, 1e-3), ref)


def test_group_advantages_and_ppo_clip():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    a = dm.group_advantages(r, 3, clip=5.0)
    torch.testing.assert_close(a[:3], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4, rtol=0)
    assert torch.all(a[3:] == 0)  # equal rewards in a group: no signal
    assert dm.group_advantages(torch.tensor([0.0, 0, 0, 100]), 4, clip=1.0).max() == 1.0
    with pytest.raises(ValueError, match="group_size"):
        dm.group_advantages(torch.ones(5), 2, 5.0)
    adv = torch.tensor([1.0, -1.0])
    logp_old = torch.zeros(2)
    logp = torch.tensor([0.5, 0.5], requires_grad=True)  # ratio e^0.5 ~ 1.65, outside the clip range
    loss, frac, _ = dm.grpo_clip_loss(logp, logp_old, adv, 0.2)
    # positive advantage: clipped at 1.2 (no gradient); negative advantage: unclipped term dominates
    torch.testing.assert_close(loss, (-1.2 + math.exp(0.5)) / 2 * torch.ones(()))
    loss.backward()
    assert logp.grad[0] == 0 and logp.grad[1] > 0
    assert frac == 1.0


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_sampled_ddim_step_logprob_is_the_scheduler_density(eta):
    """Sample x_prev with diffusers' DDIMScheduler.step (eta > 0, fixed variance_noise); its log-density under the
    Gaussian whose mean/std are rebuilt from diffusers (the noise-free step, eta * sqrt(_get_variance)) in float64."""
    s = ddim()
    s.set_timesteps(8)
    torch.manual_seed(1)
    x, eps, noise = torch.randn(3, 2, 4, 3, 5, 5).unbind(0)
    ab = s.alphas_cumprod
    for t in s.timesteps:
        prev = t - 125
        sample = s.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        mean_ref = s.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample.double()
        std_ref = eta * s._get_variance(t, prev).double().sqrt()
        ref = torch.distributions.Normal(mean_ref, std_ref).log_prob(sample.double()).flatten(1).mean(1)
        ab_prev = ab[prev] if prev >= 0 else s.final_alpha_cumprod
        mean, std = dm.ddim_sde_mean_std(ab[t], ab_prev, x, eps, eta)
        torch.testing.assert_close(dm.gaussian_logprob(sample, mean, std).double(), ref, rtol=1e-5, atol=1e-4)


def test_flow_sde_step_logprob_is_the_reverse_sde_euler_maruyama_density():
    """Flow SDE (Flow-GRPO): with x = (1 - s) x0 + s n and v = n - x0 the exact score is -(x - (1 - s) x0) / s^2; the
    Euler-Maruyama step of dx = [v - g^2/2 score] dt + g dW (dt < 0, g = a sqrt(s / (1 - s))) is N(mean, g^2 |dt|).
    Built here in float64 from that definition; the library's step and log-prob must agree with it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(6)
    sig = sch.sigmas
    torch.manual_seed(2)
    x0, n, z = torch.randn(3, 2, 4, 2, 4, 4).double().unbind(0)
    a = 0.7
    for i in range(1, len(sig) - 1):  # sigma < 1 (the first step uses sigma_max in the library)
        s, s_next = sig[i].double(), sig[i + 1].double()
        x, v = (1 - s) * x0 + s * n, n - x0
        g = a * (s / (1 - s)).sqrt()
        dt = s_next - s
        score = -(x - (1 - s) * x0) / s ** 2
        mean_ref = x + (v - 0.5 * g ** 2 * score) * dt
        std_ref = g * (-dt).sqrt()
        sample = mean_ref + std_ref * z
        ref = torch.distributions.Normal(mean_ref, std_ref).log_prob(sample).flatten(1).mean(1)
        mean, std = dm.flow_sde_mean_std(x.float(), v.float(), sig[i], sig[i + 1], a, float(sig[1]))
        torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(dm.gaussian_logprob(sample.float(), mean, std).double(), ref, rtol=1e-4, atol=1e-4)


def test_ppo_on_policy_ratio_is_one_and_clipping_lets_small_steps_through():
    torch.manual_seed(3)
    adv = torch.randn(6)
    logp_old = torch.randn(6)
    # On-policy: ratio exactly 1, the clipped objective and its gradient equal the unclipped -A rho.
    logp = logp_old.clone().requires_grad_(True)
    loss, frac, ratio = dm.grpo_clip_loss(logp, logp_old, adv, 1e-4)
    assert torch.equal(ratio, torch.ones(6)) and frac == 0
    loss.backward()
    lp2 = logp_old.clone().requires_grad_(True)
    (-adv * torch.exp(lp2 - logp_old)).mean().backward()
    torch.testing.assert_close(loss.detach(), -adv.mean())
    torch.testing.assert_close(logp.grad, lp2.grad)
    assert torch.all(logp.grad != 0)
    # Inside the clip range a step's gradient passes unchanged; outside it passes only where it moves back.
    delta = torch.tensor([5e-5, -5e-5, 5e-5, -5e-5, 1e-3, -1e-3])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    logp = (logp_old + delta).requires_grad_(True)
    loss, frac, _ = dm.grpo_clip_loss(logp, logp_old, adv, 1e-4)
    loss.backward()
    assert torch.all(logp.grad[:4] != 0) and torch.all(logp.grad[4:] == 0) and abs(float(frac) - 2 / 6) < 1e-6
    diag = dm.ppo_diagnostics(logp.detach(), logp_old, 1e-4)
    assert abs(diag["clipfrac"] - 2 / 6) < 1e-6 and diag["approx_kl"] > 0 and diag["ratio_max"] > 1 > diag["ratio_min"]


def test_dpo_loss_prefers_lower_winner_error():
    zero = torch.zeros(3)
    loss0, acc0, _ = dm.diffusion_dpo_loss(zero, zero, zero, zero, 100.0)
    torch.testing.assert_close(loss0, torch.tensor(math.log(2)))
    better, acc, inside = dm.diffusion_dpo_loss(torch.full((3,), 0.1), torch.full((3,), 0.2), zero + 0.15, zero + 0.15, 100.0)
    assert better < loss0 and acc == 1 and torch.allclose(inside, torch.full((3,), 5.0))
    torch.testing.assert_close(dm.gaussian_kl_same_std(torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 1), 0.5)),
                               torch.full((2,), 2.0))


def test_distortions():
    torch.manual_seed(0)
    T = 10
    video = torch.rand(2, T, 3, 8, 8)
    assert torch.equal(apply_distortion(video, "reverse"), video.flip(1))
    L = max_shuffle_block(T)
    assert L == 2
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        out = shuffle_blocks(video, 1.0, g)
        for b in range(2):
            # each output frame comes from a source frame at most L - 1 positions away, and something moved
            src = [int(torch.argmin(((video[b] - out[b, t]) ** 2).flatten(1).sum(1))) for t in range(T)]
            assert sorted(src) == list(range(T))
            assert max(abs(s - t) for t, s in enumerate(src)) <= L - 1
            assert src != list(range(T))
    assert max_shuffle_block(40) == 8
    blurred = gaussian_blur(video, 1.0)
    assert blurred.shape == video.shape and blurred.std() < video.std()
    for op in ("blur", "color_shift", "noise", "spatial", "hybrid", "shuffle"):
        out = apply_distortion(video, op, 0.5, torch.Generator().manual_seed(1))
        assert out.shape == video.shape and not torch.equal(out, video) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="op"):
        apply_distortion(video, "warp")
    cur = DistortionCurriculum([{"ops": ["reverse"], "strength": 1.0}, {"ops": ["noise"], "strength": 0.5}], every=3)
    assert [cur.stage(s)["ops"][0] for s in range(8)] == ["reverse"] * 3 + ["noise"] * 5
    losers, ops = cur(video, step=0)
    assert ops == ["reverse", "reverse"] and torch.equal(losers, video.flip(1))
    with pytest.raises(ValueError, match=r"curriculum\[0\].ops"):
        validate_curriculum([{"ops": ["teleport"]}])
    with pytest.raises(ValueError, match="strength"):
        validate_curriculum([{"ops": ["noise"], "strength": 3}])


def test_toy_reward_is_differentiable_and_checks_input():
    rw = ToyColorReward()
    video = torch.full((2, 4, 3, 8, 8), 0.5, requires_grad=True)
    out = rw(video, ["a red square", "a blue circle"])
    assert set(out) == {"quality", "semantic"} and out["semantic"].shape == (2,)
    out["semantic"].sum().backward()
    assert video.grad[0, :, 0].mean() > 0 and video.grad[0, :, 1].mean() < 0  # red prompt: more red, less green
    red = torch.zeros(1, 4, 3, 8, 8)
    red[:, :, 0] = 1
    assert rw(red, ["red"])["semantic"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        rw(torch.zeros(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        rw(torch.full((1, 2, 3, 4, 4), float("nan")), ["a"])
    with pytest.raises(ValueError, match="prompts"):
        rw(video, ["only one"])
