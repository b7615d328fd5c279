"""CompositionConfig: which layers are connected and how the cross-attention is shaped."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

from .fields import DictConfig, check_value, config_field

Connection = tuple[int, int]  # (augment_layer, anchor_layer), 0-indexed decoder blocks
# anchor layer -1: the anchor's embeddings, i.e. the input of its first block (the output of "block -1")
EMBEDDINGS = -1


@dataclass
class CompositionConfig(DictConfig):
    """How an anchor and its augmenting models are connected (CALM, paper §3.1).

    Every field has a default that follows the paper; leave a field at ``None`` to get it. Each field's help is
    what ``lmcompose train --help`` prints for its flag.
    """

    num_connections: Optional[int] = config_field(
        None, "N evenly spaced connections (default: one per 4 augment layers, as in the paper)", "positive",
        flag="num_connections", optional=True, metavar="N")
    # with several augments, one list of pairs per augment. Layer i is the output of decoder block i; anchor layer -1
    # is the anchor's embeddings (the input of its first block: an update there is read by every block)
    connections: Optional[list] = config_field(
        None, "explicit connections AUGMENT_LAYER:ANCHOR_LAYER, 0-indexed, e.g. 3:1,7:5; anchor layer -1 is the "
        "anchor's embeddings", "connections", flag="connections", optional=True, metavar="A:B,...")
    num_heads: Optional[int] = config_field(None, "cross-attention heads (default: the anchor's)", "positive",
                                            flag="num_heads", optional=True, metavar="N")
    norm: str = config_field("auto", "pre-norm of each connection's inputs: auto (the base model's own kind), rms, "
                             "layer or none", "choice", choices=("auto", "rms", "layer", "none"))
    # beyond the paper; needs a shared tokenizer so positions agree
    rotary: bool = config_field(False, "rotary position information between anchor queries and augment keys", "bool")
    proj_bias: bool = config_field(True, "bias in f_proj (the augment -> anchor projection)", "bool")
    # beyond the paper: lets a connection add nothing where the augment has nothing to add (the facts demo)
    null_attention: bool = config_field(
        False, "every cross-attention query may also attend to a learned key whose value is zero (scored against "
        "the average augment key), so a connection can add nothing where the augment has nothing to add", "bool",
        flag="null_attention")
    null_score: float = config_field(
        0.0, "with null_attention: the null key's initial score offset (learned); above 0 a connection starts out "
        "reading the null unless an augment key scores clearly higher", "number", flag="null_score")
    extra: dict = field(default_factory=dict)  # free-form user metadata, saved with the composition

    def __post_init__(self) -> None:
        for spec in fields(self):
            if spec.name != "extra":
                setattr(self, spec.name, check_value(spec, getattr(self, spec.name)))
        if self.connections is not None and self.num_connections is not None:
            raise ValueError("Give either num_connections or connections, not both.")
        if self.connections is not None:
            self.connections = _normalise_connections(self.connections)


def _normalise_connections(connections: Sequence) -> list:
    """Pairs -> list of [i, j]; a list of pair-lists (one per augment) -> list of lists."""
    if len(connections) == 0:
        raise ValueError("connections is empty: give at least one (augment_layer, anchor_layer) pair")

    def is_pair(x: Any) -> bool:
        return isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) for v in x)

    if all(is_pair(c) for c in connections):
        return [[int(i), int(j)] for i, j in connections]
    if all(isinstance(group, (list, tuple)) and group and all(is_pair(c) for c in group) for group in connections):
        return [[[int(i), int(j)] for i, j in group] for group in connections]
    raise ValueError(
        "connections must be [(augment_layer, anchor_layer), ...] with integer layer indices, "
        f"or one such list per augment model; got {connections!r}"
    )


def parse_connections(text: str) -> list[list[int]]:
    """Parse the command-line form ``"3:1,7:5"`` into ``[[3, 1], [7, 5]]``."""
    pairs = []
    for part in text.split(","):
        part = part.strip()
        bits = part.split(":")
        if len(bits) != 2 or not all(b.strip().lstrip("-").isdigit() for b in bits):
            raise ValueError(
                f"Bad connection {part!r} in {text!r}: expected AUGMENT_LAYER:ANCHOR_LAYER pairs "
                "separated by commas, e.g. 3:1,7:5"
            )
        pairs.append([int(bits[0]), int(bits[1])])
    return pairs


def evenly_spaced(num_layers: int, n: int) -> list[int]:
    """n layer indices spread evenly over num_layers, ending at the last layer.

    With num_layers = 4n this is every 4th layer: 3, 7, 11, ... (the paper's choice).
    """
    if n > num_layers:
        raise ValueError(f"Cannot place {n} connections in a model with {num_layers} layers")
    return [((k + 1) * num_layers) // n - 1 for k in range(n)]


def resolve_connections(
    config: CompositionConfig, augment_layers: Sequence[int], anchor_layers: int
) -> list[list[Connection]]:
    """The (augment_layer, anchor_layer) pairs of each augment, validated against the models.

    Args:
        config: the composition config.
        augment_layers: number of decoder blocks of each augment model.
        anchor_layers: number of decoder blocks of the anchor.
    Returns:
        one list of pairs per augment model.
    """
    num_augments = len(augment_layers)
    if config.connections is not None:
        conns = config.connections
        if isinstance(conns[0][0], int):  # one list of pairs, shared by every augment
            groups = [conns] * num_augments
        else:
            if len(conns) != num_augments:
                raise ValueError(
                    f"connections gives {len(conns)} lists of pairs but there are {num_augments} augment models"
                )
            groups = conns
    else:
        groups = []
        for n_aug in augment_layers:
            n = config.num_connections or max(1, n_aug // 4)
            if n > min(n_aug, anchor_layers):
                raise ValueError(
                    f"num_connections={n} is more than the layers available "
                    f"(augment has {n_aug}, anchor has {anchor_layers})"
                )
            groups.append(list(zip(evenly_spaced(n_aug, n), evenly_spaced(anchor_layers, n))))
    resolved = []
    for a, (group, n_aug) in enumerate(zip(groups, augment_layers)):
        seen = set()
        for i, j in group:
            if not 0 <= i < n_aug:
                raise ValueError(
                    f"Connection ({i}, {j}) of augment {a}: augment layer {i} is out of range; "
                    f"valid augment layers are 0..{n_aug - 1}"
                )
            if not EMBEDDINGS <= j < anchor_layers:
                raise ValueError(
                    f"Connection ({i}, {j}) of augment {a}: anchor layer {j} is out of range; "
                    f"valid anchor layers are 0..{anchor_layers - 1}, or {EMBEDDINGS} for the embeddings"
                )
            if (i, j) in seen:
                raise ValueError(f"Connection ({i}, {j}) of augment {a} is given twice")
            seen.add((i, j))
        resolved.append([(int(i), int(j)) for i, j in group])
    return resolved
