import pytest

from lmcompose.core.config import CompositionConfig, evenly_spaced, parse_connections, resolve_connections


def test_default_connections_follow_the_paper_every_fourth_augment_layer():
    resolved = resolve_connections(CompositionConfig(), [8], 12)
    assert resolved == [[(3, 5), (7, 11)]]
    assert evenly_spaced(16, 4) == [3, 7, 11, 15]


def test_default_is_at_least_one_connection_for_shallow_augments():
    assert resolve_connections(CompositionConfig(), [2], 6) == [[(1, 5)]]


def test_explicit_connections_override_and_apply_per_augment():
    config = CompositionConfig(connections=[[(0, 1)], [(1, 0), (0, 2)]])
    assert resolve_connections(config, [2, 2], 3) == [[(0, 1)], [(1, 0), (0, 2)]]


def test_out_of_range_connection_names_the_valid_range():
    with pytest.raises(ValueError, match=r"anchor layer 9 is out of range; valid anchor layers are 0\.\.3"):
        resolve_connections(CompositionConfig(connections=[(0, 9)]), [4], 4)
    with pytest.raises(ValueError, match=r"augment layer 5 is out of range; valid augment layers are 0\.\.1"):
        resolve_connections(CompositionConfig(connections=[(5, 0)]), [2], 4)


def test_too_many_connections_is_an_error():
    with pytest.raises(ValueError, match="more than the layers available"):
        resolve_connections(CompositionConfig(num_connections=5), [4], 8)


def test_json_round_trip():
    config = CompositionConfig(connections=[(1, 2), (3, 3)], num_heads=2, rotary=True)
    again = CompositionConfig.from_json(config.to_json())
    assert again == config


def test_unknown_fields_and_bad_values_are_named():
    with pytest.raises(ValueError, match="Unknown CompositionConfig fields"):
        CompositionConfig.from_dict({"num_conections": 2})
    with pytest.raises(ValueError, match="num_connections must be a positive integer"):
        CompositionConfig(num_connections=0)
    with pytest.raises(ValueError, match="either num_connections or connections"):
        CompositionConfig(num_connections=1, connections=[(0, 0)])
    with pytest.raises(ValueError, match="connections must be"):
        CompositionConfig(connections=[(0, "a")])


def test_parse_connections_command_line_form():
    assert parse_connections("3:1, 7:5") == [[3, 1], [7, 5]]
    with pytest.raises(ValueError, match="AUGMENT_LAYER:ANCHOR_LAYER"):
        parse_connections("3-1")
