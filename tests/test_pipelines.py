"""pipelines/: profiles and the size arithmetic, without HTTP."""

from __future__ import annotations

import pytest

from pipelines.profiles import PROFILES
from server.service.edit import size_from_reference


def test_profiles_schedules():
    assert PROFILES["edit"].schedule(None) == (28, None)
    assert PROFILES["edit"].schedule(4) == (4, None)
    with pytest.raises(ValueError):
        PROFILES["edit"].schedule(3)
    steps, sigmas = PROFILES["turbo"].schedule(None)
    # fal/FLUX.2-dev-Turbo model card, "Usage"
    assert (steps, sigmas) == (8, [1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031])
    steps, sigmas = PROFILES["flash"].schedule(50)  # fixed: a requested step count does not apply
    assert steps == 4 and len(sigmas) == 4 and sigmas[0] == 1.0


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 768), (1024, 768)),
        ((300, 200), (768, 512)),  # scaled up to 512 on the short side, aspect kept
        ((4000, 3000), (2048, 1536)),  # scaled down to 2048 on the long side
        ((1010, 1030), (1008, 1024)),  # rounded to the nearest multiple of 16
        ((5000, 400), (2048, 512)),  # aspect can't be kept within limits: each side clamped
    ],
)
def test_size_from_reference(size, expected):
    assert size_from_reference(*size, multiple=16) == expected
