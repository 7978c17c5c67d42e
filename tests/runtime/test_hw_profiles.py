"""Hardware profiles: every built-in loads and cites its numbers; broken files name file and field."""

import tomllib
from importlib import resources

import pytest

from tmkt.hw_profiles import HwProfileError, builtin_names, load_profile, load_profiles

NUMERIC = ("e_synop_pj", "e_neuron_update_pj", "e_mac_pj", "e_spike_pj", "static_power_mw", "time_step_us")
GOOD = """name = "mine"
description = "my chip"
event_driven = true
e_synop_pj = 2.0
e_neuron_update_pj = 3.0
e_mac_pj = 4.0

[sources]
e_synop_pj = "datasheet p. 3"
e_neuron_update_pj = "datasheet p. 4"
e_mac_pj = "datasheet p. 5"
"""


def test_builtins_are_the_documented_six():
    assert builtin_names() == ["cmos45nm-fp32", "cmos45nm-int8", "cpu", "gpu", "loihi", "spinnaker2"]


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_loads_and_cites_every_number(name):
    p = load_profile(name)
    assert p.name == name and p.description
    raw = tomllib.loads(resources.files("tmkt.hw_profiles").joinpath(f"{name}.toml").read_text())
    for field in NUMERIC:
        if getattr(p, field) is not None:
            assert raw[field] == getattr(p, field)
            assert len(p.sources[field]) > 20, f"{name}: {field} needs a real source"
    for field in p.unverified:
        assert "UNVERIFIED" in p.sources[field]


def test_builtin_numbers_match_their_sources():
    fp32, int8, loihi = load_profile("cmos45nm-fp32"), load_profile("cmos45nm-int8"), load_profile("loihi")
    assert fp32.e_mac_pj == pytest.approx(3.7 + 0.9) and fp32.e_synop_pj == 0.9
    assert int8.e_mac_pj == pytest.approx(0.2 + 0.03) and int8.e_synop_pj == 0.03
    assert (loihi.e_synop_pj, loihi.e_neuron_update_pj, loihi.e_spike_pj, loihi.e_mac_pj) == (23.6, 81.0, 1.7, None)
    assert "Table 2" in loihi.sources["e_synop_pj"] and "Davies" in loihi.sources["e_synop_pj"]
    for dense in ("cpu", "gpu"):
        p = load_profile(dense)
        assert not p.event_driven and p.e_mac_pj == p.e_synop_pj and "Degnan" in p.sources["e_mac_pj"]


def test_user_profile_by_path_and_lists(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(GOOD)
    p = load_profile(f)
    assert (p.name, p.e_synop_pj, p.e_mac_pj, p.path) == ("mine", 2.0, 4.0, str(f))
    assert [q.name for q in load_profiles(f"loihi, {f}")] == ["loihi", "mine"]
    assert len(load_profiles(None)) == len(load_profiles("all")) == 6
    with pytest.raises(HwProfileError, match="given twice"):
        load_profiles("loihi,loihi")


@pytest.mark.parametrize(
    "edit,field",
    [
        (lambda t: t.replace("e_synop_pj = 2.0\n", ""), "e_synop_pj"),  # missing
        (lambda t: t.replace("e_synop_pj = 2.0", "e_synop_pJ = 2.0"), "e_synop_pJ"),  # misspelled
        (lambda t: t.replace("e_synop_pj = 2.0", 'e_synop_pj = "2 pJ"'), "e_synop_pj"),  # wrong type
        (lambda t: t.replace("e_mac_pj = 4.0", "e_mac_pj = true"), "e_mac_pj"),  # bool is not a number
        (lambda t: t.replace("e_mac_pj = 4.0", "e_mac_pj = -1.0"), "e_mac_pj"),  # negative
        (lambda t: t.replace('e_mac_pj = "datasheet p. 5"\n', ""), "sources.e_mac_pj"),  # number without source
        (lambda t: t.replace("event_driven = true", "event_driven = 1"), "event_driven"),
        (lambda t: t.replace('name = "mine"\n', ""), "name"),
        (lambda t: t.replace("e_mac_pj = 4.0", "e_mac_pj = 4.0\nstatic_power_mw = 5.0"), "time_step_us"),
        (lambda t: t.replace("event_driven = true", "event_driven = false").replace("e_mac_pj = 4.0\n", "")
         .replace('e_mac_pj = "datasheet p. 5"\n', ""), "e_mac_pj"),  # dense device without a MAC cost
        (lambda t: t.replace("[sources]", 'unverified = ["e_spike_pj"]\n[sources]'), "unverified"),  # not set
    ],
)
def test_broken_profile_names_file_and_field(tmp_path, edit, field):
    f = tmp_path / "broken.toml"
    f.write_text(edit(GOOD))
    with pytest.raises(HwProfileError) as err:
        load_profile(f)
    msg = str(err.value)
    assert str(f) in msg and f"field {field!r}" in msg


def test_misspelled_field_gets_a_suggestion(tmp_path):
    f = tmp_path / "typo.toml"
    f.write_text(GOOD.replace("e_synop_pj = 2.0", "e_synop_pJ = 2.0"))
    with pytest.raises(HwProfileError, match="did you mean 'e_synop_pj'"):
        load_profile(f)


def test_invalid_toml_and_unknown_names(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("name = \n")
    with pytest.raises(HwProfileError, match="bad.toml: not valid TOML"):
        load_profile(f)
    with pytest.raises(HwProfileError, match="unknown hardware profile 'tpu'.*loihi"):
        load_profile("tpu")
    with pytest.raises(HwProfileError, match="no such profile file"):
        load_profile(tmp_path / "missing.toml")
