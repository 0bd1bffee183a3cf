"""AUTOMATIC1111's seed options as orchestrator.pipeline.sampling.Seeds draws them: "Resize seed from" keeps another
size's noise at the centre, the variation seed mixes in its noise at that size too, and ENSD reseeds the samplers'
own noise after the initial noise. Real torch generators throughout; no model runs here (tests/test_paste.py and
tests/test_field_walk.py run them through the API)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.pipeline.sampling import Seeds


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
