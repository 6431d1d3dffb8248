"""The settings table: defaults, precedence, and every rule (SPEC §3)."""
from __future__ import annotations

import dataclasses
import math
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from mps import config
from mps.config import Settings, resolve
from mps.errors import EXIT_USAGE, MpsError, SettingError
from mps.sockets import Address, parse_bind

SEED_DEFAULTS = {
    "bind": "127.0.0.1:8000",
    "backlog": 1024,
    "start_servers": 32,
    "min_spare": 8,
    "max_spare": 32,
    "max_children": 64,
    "max_requests": 128,
    "max_requests_jitter": 0,
    "timeout": 0,
    "graceful_timeout": 30,
    "backend": "auto",
    "status_socket": None,
    "pid_file": None,
    "daemon": False,
    "log_file": None,
    "log_level": "info",
}


def refused(name: str, **kwargs: Any) -> SettingError:
    """resolve() must refuse, naming ``name``; the error, for further checks."""
    with pytest.raises(SettingError) as info:
        resolve(**{"environ": {}, **kwargs})
    err = info.value
    assert err.name == name, str(err)
    assert str(err).startswith(f"setting {name}="), str(err)
    assert "\n" not in str(err)
    assert err.exit_code == EXIT_USAGE
    return err


# ----------------------------------------------------------------- defaults


def test_defaults_are_the_seeds() -> None:
    s = resolve(environ={})
    for name, value in SEED_DEFAULTS.items():
        assert getattr(s, name) == value, name
    assert s == Settings()


def test_every_setting_is_declared_with_help_and_kind() -> None:
    names = [f.name for f in config.fields()]
    assert set(SEED_DEFAULTS) <= set(names)
    assert len(names) == len(set(names))
    for f in config.fields():
        assert f.metadata["help"].strip(), f.name
        assert f.metadata["kind"] in {"int", "float", "bool", "str", "choice", "path"}, f.name
        assert config.flag(f.name) == "--" + f.name.replace("_", "-")
        assert config.env_var(f.name) == "MPS_" + f.name.upper()


def test_settings_are_frozen() -> None:
    s = resolve(environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.backlog = 5  # type: ignore[misc]


def test_public_is_a_plain_dict_of_every_setting() -> None:
    doc = resolve(environ={}, keywords={"max_requests": 9}).public()
    assert doc["max_requests"] == 9
    assert set(doc) == {f.name for f in config.fields()}


def test_settings_markdown_has_one_row_per_setting() -> None:
    table = config.settings_markdown()
    for f in config.fields():
        rows = [r for r in table.splitlines() if r.startswith(f"| `{f.name}` |")]
        assert len(rows) == 1, f.name
        assert f"`{config.flag(f.name)}`" in rows[0]
        assert f"`{config.env_var(f.name)}`" in rows[0]


# ----------------------------------------------------------------- precedence


def test_env_overrides_default() -> None:
    s = resolve(environ={"MPS_BACKLOG": "2048", "MPS_BIND": "unix:/tmp/x.sock",
                         "MPS_TIMEOUT": "2.5", "MPS_DAEMON": "yes", "MPS_BACKEND": "python"})
    assert (s.backlog, s.bind, s.timeout, s.daemon, s.backend) == \
        (2048, "unix:/tmp/x.sock", 2.5, True, "python")


def test_keyword_overrides_env() -> None:
    s = resolve(keywords={"backlog": 3000}, environ={"MPS_BACKLOG": "2048",
                                                     "MPS_MAX_REQUESTS": "7"})
    assert s.backlog == 3000
    assert s.max_requests == 7      # env still applies where no keyword is given


def test_command_line_overrides_keyword_and_env() -> None:
    s = resolve(keywords={"backlog": 3000, "min_spare": 2},
                command_line={"backlog": 4000},
                environ={"MPS_BACKLOG": "2048", "MPS_MAX_SPARE": "5"})
    assert (s.backlog, s.min_spare, s.max_spare) == (4000, 2, 5)


def test_environ_none_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPS_MAX_REQUESTS", "77")
    assert resolve().max_requests == 77
    monkeypatch.delenv("MPS_MAX_REQUESTS")
    assert resolve().max_requests == 128


def test_unrelated_environment_is_ignored() -> None:
    s = resolve(environ={"MPS": "1", "MPS_": "x", "BACKLOG": "1", "mps_backlog": "3"})
    assert s.backlog == 1024


def test_int_given_for_a_float_setting_becomes_a_float() -> None:
    s = resolve(environ={}, keywords={"timeout": 3, "graceful_timeout": 0})
    assert s.timeout == 3.0 and isinstance(s.timeout, float)
    assert isinstance(s.graceful_timeout, float)


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("ON", True),
                                         ("yes", True), ("0", False), ("off", False),
                                         ("no", False), ("", False), ("False", False)])
def test_env_bool_spellings(text: str, value: bool) -> None:
    assert resolve(environ={"MPS_DAEMON": text}).daemon is value


# ----------------------------------------------------------------- rules


def test_min_spare_above_max_spare() -> None:
    err = refused("min_spare", keywords={"min_spare": 40, "max_spare": 10})
    assert "max_spare" in err.rule


def test_start_servers_above_max_children() -> None:
    err = refused("start_servers", keywords={"start_servers": 65})
    assert "max_children" in err.rule


def test_max_children_above_backlog() -> None:
    err = refused("max_children", keywords={"max_children": 100, "backlog": 50,
                                            "start_servers": 10})
    assert "backlog" in err.rule


def test_combination_rules_see_the_merged_layers() -> None:
    # min_spare from the environment, max_spare from the command line.
    refused("min_spare", environ={"MPS_MIN_SPARE": "6"}, command_line={"max_spare": 5})


def test_equal_bounds_are_allowed() -> None:
    s = resolve(environ={}, keywords={"min_spare": 5, "max_spare": 5, "start_servers": 7,
                                      "max_children": 7, "backlog": 7})
    assert (s.min_spare, s.max_spare, s.max_children) == (5, 5, 7)


def test_zero_where_zero_means_off_or_none() -> None:
    s = resolve(environ={}, keywords={"start_servers": 0, "min_spare": 0, "max_requests": 0,
                                      "timeout": 0, "graceful_timeout": 0})
    assert (s.start_servers, s.min_spare, s.max_requests, s.timeout) == (0, 0, 0, 0)


@pytest.mark.parametrize("name, value", [
    ("backlog", -1), ("backlog", 0), ("start_servers", -1), ("min_spare", -1),
    ("max_spare", -1), ("max_spare", 0), ("max_children", -1), ("max_children", 0),
    ("max_requests", -1), ("max_requests_jitter", -5), ("timeout", -1.0),
    ("graceful_timeout", -0.5),
])
def test_negative_or_too_small_numbers(name: str, value: float) -> None:
    err = refused(name, keywords={name: value})
    assert "at least" in err.rule
    assert err.value == value


@pytest.mark.parametrize("name", ["timeout", "graceful_timeout"])
def test_nan_is_not_a_number_of_seconds(name: str) -> None:
    # NaN passes `value < minimum` (every comparison with NaN is False).  A
    # NaN graceful_timeout makes `now >= stop_deadline` never true: a TERM
    # would wait for busy children forever.
    refused(name, keywords={name: math.nan})
    refused(name, environ={config.env_var(name): "nan"})


@pytest.mark.parametrize("bind", [
    "nonsense", "127.0.0.1", ":8000", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000",
    "127.0.0.1:-1", "::1:8000", "[::1]8000", "[::1]:", "[]:80", "unix:", "fd://", "fd://x",
    "fd://-1", "unix:/" + "x" * 200, "",
])
def test_bad_bind_strings(bind: str) -> None:
    err = refused("bind", keywords={"bind": bind})
    assert err.value == bind


def test_bad_bind_from_the_environment() -> None:
    refused("bind", environ={"MPS_BIND": "localhost"})


@pytest.mark.parametrize("name, value", [("backend", "rust"), ("backend", "C"),
                                         ("log_level", "verbose"), ("backend", "")])
def test_bad_choice(name: str, value: str) -> None:
    err = refused(name, keywords={name: value})
    assert "must be one of" in err.rule


@pytest.mark.parametrize("var, name", [("MPS_MAX_CHILDREN", "max_children"),
                                       ("MPS_BACKLOG", "backlog"),
                                       ("MPS_TIMEOUT", "timeout"),
                                       ("MPS_DAEMON", "daemon")])
def test_non_numeric_env_value(var: str, name: str) -> None:
    err = refused(name, environ={var: "abc"})
    assert var in err.rule                  # the operator learns where the value came from


@pytest.mark.parametrize("text", ["2.5", "1e3", "0x10", "ten"])
def test_env_int_must_be_an_integer(text: str) -> None:
    refused("backlog", environ={"MPS_BACKLOG": text})


@pytest.mark.parametrize("layer", ["keywords", "command_line"])
def test_unknown_name(layer: str) -> None:
    err = refused("max_child", **{layer: {"max_child": 3}})
    assert "no such setting" in err.rule


@pytest.mark.parametrize("name, value", [("backlog", "10"), ("backlog", True),
                                         ("start_servers", 2.5), ("timeout", "1"),
                                         ("daemon", 1), ("bind", 8000), ("pid_file", 3)])
def test_wrong_type_from_python(name: str, value: object) -> None:
    err = refused(name, keywords={name: value})
    assert "type" in err.rule


@pytest.mark.parametrize("name", ["pid_file", "log_file", "status_socket"])
def test_path_in_a_missing_directory(name: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such" / "dir" / "file")
    refused(name, keywords={name: missing})
    refused(name, keywords={name: ""})
    assert getattr(resolve(environ={}, keywords={name: str(tmp_path / "f")}), name) \
        == str(tmp_path / "f")


def test_setting_error_is_an_mps_error_with_one_line() -> None:
    err = SettingError("backlog", -1, "must be at least 1")
    assert isinstance(err, MpsError)
    assert str(err) == "setting backlog=-1: must be at least 1"


# ----------------------------------------------------------------- parse_bind


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8000", Address(socket.AF_INET, host="127.0.0.1", port=8000)),
    ("0.0.0.0:0", Address(socket.AF_INET, host="0.0.0.0", port=0)),
    ("localhost:65535", Address(socket.AF_INET, host="localhost", port=65535)),
    ("[::1]:8000", Address(socket.AF_INET6, host="::1", port=8000)),
    ("[::]:80", Address(socket.AF_INET6, host="::", port=80)),
    ("unix:/x", Address(socket.AF_UNIX, path="/x")),
    ("unix:relative/app.sock", Address(socket.AF_UNIX, path="relative/app.sock")),
    ("fd://3", Address(-1, fd=3)),
    ("fd://0", Address(-1, fd=0)),
])
def test_parse_bind_valid_forms(text: str, expected: Address) -> None:
    assert parse_bind(text) == expected
    assert parse_bind(text).describe() == text
    assert resolve(environ={}, keywords={"bind": text}).bind == text


# ----------------------------------------------------------------- property


POOL = ("backlog", "start_servers", "min_spare", "max_spare", "max_children",
        "max_requests", "max_requests_jitter")
MINIMUM = {f.name: f.metadata["minimum"] for f in config.fields() if f.name in POOL}


def expected_valid(v: dict[str, int]) -> bool:
    return (all(v[n] >= MINIMUM[n] for n in POOL)
            and v["min_spare"] <= v["max_spare"]
            and v["start_servers"] <= v["max_children"]
            and v["max_children"] <= v["backlog"])


small = st.integers(min_value=-3, max_value=80)


@hsettings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({n: small for n in POOL}), st.booleans())
def test_any_integer_combination_is_valid_or_a_setting_error(
        values: dict[str, int], through_env: bool) -> None:
    try:
        if through_env:
            s = resolve(environ={config.env_var(n): str(v) for n, v in values.items()})
        else:
            s = resolve(environ={}, keywords=values)
    except SettingError as err:
        assert err.name in POOL
        assert not expected_valid(values), f"valid settings refused: {err}"
        return
    assert expected_valid(values), f"invalid settings accepted: {values}"
    assert all(getattr(s, n) == values[n] for n in POOL)
    assert 0 <= s.min_spare <= s.max_spare
    assert 0 <= s.start_servers <= s.max_children <= s.backlog
    assert s.max_requests >= 0 and s.max_requests_jitter >= 0
