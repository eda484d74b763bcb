"""The federation's configuration is declared once (bract.flower.config): the command
line, Flower's run config and Python construction describe the same federation, and
each refuses the same bad values."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.flower.config import OPTIONS, RUN_CONFIG_DEFAULTS, FederationConfig, Option
from bract.records.roster import Roster

_BY_NAME = {o.name: o for o in OPTIONS}


def _value(option: Option) -> st.SearchStrategy:
    """Any value the option accepts (None where it can be unset)."""
    if option.name in ("num_classes", "in_channels", "device", "out", "roster"):
        return st.just(option.default)  # declared together / not in the run config
    if option.kind is bool:
        base: st.SearchStrategy = st.booleans()
    elif option.choices:
        base = st.sampled_from(option.choices)
    elif option.kind is int:
        low = int(option.low or 0) + (1 if option.open_low else 0)
        base = st.integers(low, low + 10_000)
    elif option.kind is float:
        low = float(option.low or 0.0)
        high = float(option.high) if option.high is not None else 1e6
        base = st.floats(low, high, allow_nan=False, allow_infinity=False,
                         exclude_min=option.open_low, exclude_max=option.open_high)
    else:
        # A bare "--" cannot travel as a flag's value (argparse reads it as the end of
        # the options); the CLI refuses it by name (tested below).
        base = st.text("abcdef-_/.0123456789", max_size=12).filter(lambda t: t != "--")
    return st.one_of(st.none(), base) if option.unset else base


@st.composite
def federations(draw: st.DrawFn) -> FederationConfig:
    values = {o.name: draw(_value(o)) for o in OPTIONS}
    # Settings that must agree (checked by the config itself, tested below).
    values["secagg"] = False
    values["release_metrics"] = draw(st.sampled_from(("none", "clear")))
    return FederationConfig(**values)


@settings(max_examples=200, deadline=None)
@given(federations())
def test_the_run_config_round_trips_every_federation(fed: FederationConfig) -> None:
    """Flower's run config carries every setting exactly; unset settings travel as their
    word, never as a number, so no number can be mistaken for "not set"."""
    rc = fed.to_run_config()
    assert set(rc) == set(RUN_CONFIG_DEFAULTS)
    for option in OPTIONS:
        if option.run_config and getattr(fed, option.name) is None:
            assert rc[option.key] == option.unset
    assert FederationConfig.from_run_config(rc) == replace(fed, device=None)


def _argv(fed: FederationConfig) -> list[str]:
    argv: list[str] = []
    for option in OPTIONS:
        if not option.flag:
            continue
        value = getattr(fed, option.name)
        if option.kind is bool:
            argv.append(f"--{option.key}" if value else f"--no-{option.key}")
        elif value is None:
            argv += [f"--{option.key}", option.unset] if option.unset else []
        else:
            argv += [f"--{option.key}={value!r}" if option.kind is float
                     else f"--{option.key}={value}"]
    return argv


@settings(max_examples=200, deadline=None)
@given(federations())
def test_the_flags_describe_the_same_federation(fed: FederationConfig) -> None:
    parser = argparse.ArgumentParser()
    FederationConfig.add_arguments(parser)
    args = parser.parse_args(_argv(fed))
    secagg_set = [o.key for o in OPTIONS if o.name.startswith("secagg_") and o.flag
                  and getattr(fed, o.name) != o.default]
    if not fed.secagg and secagg_set:
        # A secure-aggregation flag with --no-secagg is refused, naming each one.
        with pytest.raises(ValueError, match="which --no-secagg turns off") as refused:
            FederationConfig.from_args(args)
        assert all(f"--{key} " in str(refused.value) for key in secagg_set)
        return
    parsed = FederationConfig.from_args(args)
    # Options without a flag (out, roster, reply-poll, resume) keep their defaults.
    assert parsed == replace(fed, **{o.name: getattr(parsed, o.name) for o in OPTIONS
                                     if not o.flag})


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.flag and o.kind is str
                                    and not o.choices])
def test_a_bare_double_dash_as_a_value_is_refused_by_name(option: Option) -> None:
    parser = argparse.ArgumentParser()
    FederationConfig.add_arguments(parser)
    args = parser.parse_args([f"--{option.key}=--"])
    with pytest.raises(ValueError, match=f"--{option.key}: no value"):
        FederationConfig.from_args(args)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.kind in (int, float)],
                         ids=lambda o: o.key)
def test_every_number_is_refused_out_of_range_everywhere(option: Option) -> None:
    """Below its bound, a number is refused by the constructor, the run config and the
    flag alike, each naming the setting."""
    if option.low is None:
        pytest.skip("unbounded")
    bad = option.low if option.open_low else option.low - 1
    with pytest.raises(ValueError, match=f"^{option.key}="):
        FederationConfig(**{option.name: option.kind(bad)})
    if option.run_config:
        with pytest.raises(ValueError, match=f"^run config {option.key}="):
            FederationConfig.from_run_config({option.key: option.kind(bad)})
    if option.flag:
        parser = argparse.ArgumentParser(exit_on_error=False)
        FederationConfig.add_arguments(parser, [option.name])
        with pytest.raises(argparse.ArgumentError, match=f"--{option.key}"):
            parser.parse_args([f"--{option.key}={option.kind(bad)}"])


def test_settings_that_must_agree_are_refused_together() -> None:
    with pytest.raises(ValueError, match="needs at least 3 hospitals"):
        FederationConfig(clients=2)
    with pytest.raises(ValueError, match="aggregate needs secure aggregation"):
        FederationConfig(secagg=False, release_metrics="aggregate")
    with pytest.raises(ValueError, match="never in clear"):
        FederationConfig(release_metrics="clear")
    with pytest.raises(ValueError, match="cannot honour the collusion bound"):
        FederationConfig(clients=40, secagg_graph="harary")
    with pytest.raises(ValueError, match="both num-classes and in-channels"):
        FederationConfig(dataset="medmnist", num_classes=3)
    assert FederationConfig(clients=2, secagg=False).clients == 2


def test_one_table_declares_every_field() -> None:
    assert [f.name for f in fields(FederationConfig)] == [o.name for o in OPTIONS]
    for f in fields(FederationConfig):
        assert f.default == _BY_NAME[f.name].default, f.name


def test_task_and_policy_follow_the_federation(tmp_path: Path) -> None:
    fed = FederationConfig(dataset="breast-cancer", batch_size=16, noise_multiplier=0.0,
                           seed=4, secagg=False)
    task, policy = fed.task(), fed.policy()
    assert (task.dataset, task.batch_size, task.lr) == ("breast-cancer", 16, 0.2)
    assert policy.allow_non_private and policy.noise_multiplier == 0.0
    assert policy.sampling_seed == 4  # a non-private run is made reproducible
    assert FederationConfig().policy().sampling_seed is None  # never for a private one


# ----------------------------------------------------------- secure aggregation's abort limit
_ROSTER = Roster("f", {i: bytes(32) for i in (1, 2, 3)}, {})
_ABORT_LIMIT_TAKES = "must be an integer >= 1, or 0 for no limit"


@settings(max_examples=60, deadline=None)
@given(limit=st.integers(0, 10_000), command=st.sampled_from(["simulate", "deploy"]))
def test_the_abort_limit_of_the_run_config_and_the_flags_reaches_secure_aggregation(
        limit: int, command: str) -> None:
    """``secagg-abort-limit`` (run config) and ``--secagg-abort-limit`` (bract simulate,
    bract deploy) set the server's SecAggSettings.abort_limit, 0 meaning no limit, and
    the value is what the report's config and the run config record."""
    from bract.cli import build_parser
    from bract.flower.apps import secagg_settings
    from bract.flower.simulation import SimulationConfig

    via_run_config = FederationConfig.from_run_config({"secagg-abort-limit": limit})
    args = build_parser().parse_args([command, "--secagg-abort-limit", str(limit)])
    via_flag = FederationConfig.from_args(args)
    for fed in (via_run_config, via_flag):
        assert fed.secagg_abort_limit == limit
        assert secagg_settings(fed, _ROSTER).abort_limit == (limit if limit else None)
        assert fed.to_run_config()["secagg-abort-limit"] == limit
        assert SimulationConfig(fed).to_plain()["secagg_abort_limit"] == limit
    assert secagg_settings(FederationConfig(), _ROSTER).abort_limit == 2  # the default


@pytest.mark.parametrize("bad", [-1, -7, 1.5, True, False, "2", "none", "", None])
def test_a_bad_abort_limit_is_refused_naming_the_setting(bad) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"run config secagg-abort-limit={bad!r}: {_ABORT_LIMIT_TAKES}")):
        FederationConfig.from_run_config({"secagg-abort-limit": bad})
    with pytest.raises(ValueError, match=re.escape(
            f"secagg-abort-limit={bad!r}: {_ABORT_LIMIT_TAKES}")):
        FederationConfig(secagg_abort_limit=bad)


@pytest.mark.parametrize("command", ["simulate", "deploy"])
@pytest.mark.parametrize("bad", ["-1", "1.5", "two", "true", "none", ""])
def test_a_bad_abort_limit_flag_is_one_error_line_naming_the_flag(command, bad,
                                                                   capsys) -> None:
    from bract.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--secagg-abort-limit", bad])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"bract {command}: error: argument --secagg-abort-limit: "
                      f"{_ABORT_LIMIT_TAKES}, got {bad!r}"]
