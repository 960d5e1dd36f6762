"""Every config key against boundary and wrong-typed values (Hypothesis): loading either gives a
config whose value has the declared type (numbers finite), or refuses with one ConfigError that
names the key. Nothing else escapes: no other exception, no NaN or infinity accepted."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import CONFIG_DIR, Config, ConfigError, load_config

DEMO = CONFIG_DIR / "demo.yaml"


def leaf_types(cls=Config, prefix: str = "") -> dict[str, object]:
    """Dotted key -> declared type of every user-settable leaf of the config."""
    hints, leaves = typing.get_type_hints(cls), {}
    for field in dataclasses.fields(cls):
        if field.name == "source":
            continue
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            leaves.update(leaf_types(hint, f"{prefix}{field.name}."))
        else:
            leaves[f"{prefix}{field.name}"] = hint
    return leaves


KEYS = leaf_types()
BOUNDARY_NUMBERS = [0, 1, -1, 2, 2**31, 2**32, 2**32 - 1, -(2**63), 10**400, 0.5, -0.5, 1e-300,
                    1e308, float("inf"), float("-inf"), float("nan")]
values = st.one_of(
    st.sampled_from(BOUNDARY_NUMBERS),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 3), st.floats(-2, 2), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def override_text(value) -> str:
    """How a user would write `value` on the command line (YAML flow style)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def holds(value, hint) -> bool:
    """Whether an accepted value has its declared type (tuples: each item; mappings: each value),
    numbers finite."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(holds(v, item) for v in value)
    if typing.get_origin(hint) is dict:
        item = typing.get_args(hint)[1]
        return isinstance(value, dict) and all(holds(v, item) for v in value.values())
    if hint is float:
        return isinstance(value, float) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


@pytest.mark.parametrize("key", sorted(KEYS))
@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(value=values)
def test_a_value_is_accepted_with_its_type_or_refused_naming_the_key(key, value):
    text = override_text(value)
    try:
        config = load_config(DEMO, [f"{key}={text}"])
    except ConfigError as exc:
        assert key in str(exc) or "is not the form" in str(exc), (key, text, str(exc))
        assert "\n" not in str(exc), str(exc)
        return
    accepted = functools.reduce(getattr, key.split("."), config)
    assert holds(accepted, KEYS[key]), (key, text, accepted)


def test_every_leaf_key_is_covered():
    assert len(KEYS) > 60 and "student.lr" in KEYS and "distill.sweep_alphas" in KEYS
