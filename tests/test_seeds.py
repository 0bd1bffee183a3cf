"""AUTOMATIC1111's seed options as orchestrator.pipeline.seeds.Seeds draws them: "Resize seed from" keeps another
size's noise at the centre, the variation seed mixes in its noise at that size too, and ENSD reseeds the samplers'
own noise after the initial noise. Real torch generators throughout; no model runs here (tests/test_paste.py and
tests/test_field_walk.py run them through the API)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.pipeline.seeds import Seeds


def _generator(seeds: list[int]):
    generators = Seeds(seeds).generators()
    return generators if len(generators) > 1 else generators[0]


def _noise(seeds: list[int], shape: tuple, **options) -> tuple[torch.Tensor, object]:
    generator = _generator(seeds)
    return Seeds(seeds, **options).noise(shape, generator, 8), generator


def test_plain_noise_is_diffusers_own_and_the_same_size_resize_changes_nothing():
    from diffusers.utils.torch_utils import randn_tensor

    drawn, _ = _noise([5, 6], (2, 4, 8, 8))
    assert torch.equal(drawn, randn_tensor((2, 4, 8, 8), generator=_generator([5, 6]), dtype=torch.float32))
    same, _ = _noise([5, 6], (2, 4, 8, 8), resize_from=(64, 64))
    assert torch.equal(same, drawn)


@pytest.mark.parametrize("variation", [{}, {"subseeds": [9, 10], "strength": 0.3}])
def test_a_seed_resized_from_a_smaller_size_keeps_that_sizes_noise_at_the_centre(variation):
    small, _ = _noise([5, 6], (2, 4, 8, 8), **variation)
    plain, plain_generator = _noise([5, 6], (2, 4, 12, 16), **variation)
    resized, generator = _noise([5, 6], (2, 4, 12, 16), resize_from=(64, 64), **variation)
    assert torch.equal(resized[:, :, 2:10, 4:12], small)  # 64x64's noise in the middle of 128x96's
    outside = torch.ones(12, 16, dtype=torch.bool)
    outside[2:10, 4:12] = False
    if not variation:  # around it, this size's own noise
        assert torch.equal(resized[:, :, outside], plain[:, :, outside])
    # the generators drew this size's noise as without the resize: the samplers' later noise is unchanged
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(generator, plain_generator))


def test_a_seed_resized_from_a_larger_size_is_its_centre_cut_as_automatic1111_cuts_odd_differences():
    large = torch.randn((4, 11, 11), generator=torch.Generator().manual_seed(5))
    resized, _ = _noise([5], (1, 4, 8, 8), resize_from=(88, 88))
    # AUTOMATIC1111's arithmetic: offset (8 - 11) // 2 = -2, so 11 - 4 = 7 rows and columns from the third on,
    # and the last row and column stay this size's own noise
    assert torch.equal(resized[0, :, :7, :7], large[:, 2:9, 2:9])
    plain, _ = _noise([5], (1, 4, 8, 8))
    assert torch.equal(resized[0, :, 7], plain[0, :, 7]) and torch.equal(resized[0, :, :, 7], plain[0, :, :, 7])


def test_ensd_reseeds_the_steps_generators_and_says_whether_a_sampler_drew_from_them():
    generator = _generator([5])
    assert Seeds([5]).for_steps(generator) is generator  # no delta: the initial noise's generator, drawn on
    seeding = Seeds([5, 6], delta=31337)
    steps = seeding.for_steps(_generator([5, 6]))
    expected = [torch.randn(3, generator=torch.Generator().manual_seed(s + 31337)) for s in (5, 6)]
    assert not seeding.delta_used  # reseeded, nothing drawn yet: ENSD changed nothing
    assert all(torch.equal(torch.randn(3, generator=g), e) for g, e in zip(steps, expected))
    assert seeding.delta_used


# -- AUTOMATIC1111's random number sources (orchestrator.pipeline.noise) --------------------------------
# torch.manual_seed(0); torch.randn(3, 4, device="cuda"): what PyTorch prints on any NVIDIA GPU (and the example in
# AUTOMATIC1111's modules/rng_philox.py)
CUDA_SEED_0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
               [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
               [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]


def test_philox_draws_what_torch_draws_on_an_nvidia_gpu():
    from orchestrator.pipeline.noise import Philox

    generator = Philox(0)
    first = generator.randn((3, 4))
    assert first.dtype == torch.float32 and torch.allclose(first, torch.tensor(CUDA_SEED_0), atol=1e-6, rtol=0)
    assert generator.get_state() == (0, 0, 1)
    second = generator.randn((3, 4))  # the next call: one Philox counter on, other numbers
    assert not torch.allclose(second, first) and torch.equal(Philox(0).randn((12,)), first.flatten())
    assert not torch.equal(Philox(0, stream=1).randn((3, 4)), first)  # a stream apart
    assert not torch.equal(Philox(2**32).randn((3, 4)), first)  # the key's high word counts
    many = Philox(7).randn((4, 64, 64))
    assert abs(float(many.mean())) < 0.03 and abs(float(many.std()) - 1) < 0.03


def test_the_gpu_and_nv_sources_draw_the_seeds_philox_noise_first_and_reseed_with_ensd():
    from orchestrator.pipeline.noise import Philox

    for source in ("GPU", "NV"):
        seeding = Seeds([5, 6], delta=31337, source=source)
        generators = seeding.generators()
        drawn = seeding.noise((2, 4, 8, 8), generators, 8)
        assert torch.equal(drawn, torch.cat([Philox(s).randn((1, 4, 8, 8)) for s in (5, 6)]))
        single = Seeds([5], source=source)
        assert torch.equal(single.noise((1, 4, 8, 8), single.generators()[0], 8), drawn[:1])
        # the VAE's latent sample: a stream of the seed apart, so that the noise stays the seed's first draw
        latents = seeding.for_latents(generators)
        assert [g.get_state() for g in latents] == [(5, 1, 0), (6, 1, 0)]
        steps = seeding.for_steps(generators)
        assert [g.get_state() for g in steps] == [(5 + 31337, 0, 0), (6 + 31337, 0, 0)] and not seeding.delta_used
        steps[0].randn((1, 4, 8, 8))
        assert seeding.delta_used
    cpu = Seeds([5], source="CPU")
    generators = cpu.generators()
    assert cpu.for_latents(generators) is generators  # diffusers' order: the VAE's sample, then the noise


def test_a_resized_seed_keeps_its_philox_noise_at_the_centre():
    from orchestrator.pipeline.noise import Philox

    seeding = Seeds([5], resize_from=(64, 64), source="NV")
    generator = seeding.generators()[0]
    resized = seeding.noise((1, 4, 12, 16), generator, 8)
    assert torch.equal(resized[0, :, 2:10, 4:12], Philox(5).randn((4, 8, 8)))
    assert generator.get_state() == (5, 0, 1)  # this size's noise drawn from the generator, as AUTOMATIC1111's
    assert torch.equal(resized[0, :, 0], Philox(5).randn((1, 4, 12, 16))[0, :, 0])


def test_a_samplers_own_noise_comes_from_a_philox_generator():
    """diffusers' schedulers draw their noise through randn_tensor; with a Philox generator it is Philox's (DDIM
    takes the same noise as variance_noise too, which makes the comparison exact)."""
    from orchestrator.pipeline.noise import Philox
    from orchestrator.pipeline.sampling import schedule

    sample = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    output = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

    def step(**kwargs):
        scheduler, timesteps = schedule("DDIM", config, 4, seed=0)
        return scheduler.step(output, timesteps[0], sample, eta=1.0, **kwargs).prev_sample

    pair = [Philox(3), Philox(4)]
    noise = torch.cat([Philox(3).randn((1, 4, 8, 8)), Philox(4).randn((1, 4, 8, 8))])
    assert torch.equal(step(generator=pair), step(variance_noise=noise))
    assert [g.get_state()[2] for g in pair] == [1, 1]
    cpu = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]  # torch's own: diffusers', unchanged
    expected = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    assert torch.equal(step(generator=cpu), step(variance_noise=expected))


def test_a_variation_seed_is_slerped_column_by_column_as_automatic1111_does():
    """AUTOMATIC1111's slerp of a (C, H, W) noise normalises each column (dim 1) and interpolates it on its own."""
    from orchestrator.pipeline.seeds import slerp

    low, high = (torch.randn((4, 8, 6), generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    mixed = slerp(0.3, low, high)
    for c, x in ((0, 0), (3, 5)):  # one column, by the textbook formula
        a, b = low[c, :, x], high[c, :, x]
        omega = torch.acos(torch.dot(a / a.norm(), b / b.norm()))
        expected = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
        assert torch.allclose(mixed[c, :, x], expected, atol=1e-5)
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-5) and torch.allclose(slerp(1.0, low, high), high,
                                                                                      atol=1e-5)
    assert torch.allclose(slerp(0.4, low, low), low, atol=1e-6)  # the seed as its own variation seed: its noise
