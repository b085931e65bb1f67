"""NetParameter -> NetParameter transformations applied before a Net is built.

* :func:`filter_net` keeps the layers whose include/exclude rules the
  NetState meets (Caffe's ``Net::FilterNet``);
* :func:`insert_splits` adds a ``Split`` layer after every top that feeds
  more than one consumer, so that the consumers' diffs are summed (Caffe's
  ``InsertSplits``).

Both return a new message and are idempotent.
"""

from collections import defaultdict

from netlite.errors import LayerSetupError, PrototxtError
from netlite.proto import netlite_pb2


def state_meets_rule(state, rule, layer_name=""):
    """True when ``state`` satisfies every condition of ``rule``."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_net(param):
    """Return ``param`` without the layers excluded by ``param.state``.

    A layer with neither rule is kept.  With exclude rules it is kept unless
    the state meets any of them; with include rules it is kept only if the
    state meets at least one.  Giving both kinds is an error.
    """
    state = param.state
    filtered = netlite_pb2.NetParameter()
    filtered.CopyFrom(param)
    del filtered.layer[:]
    for layer in param.layer:
        if layer.include and layer.exclude:
            raise PrototxtError(
                f"layer '{layer.name}' specifies both include and exclude rules; "
                "give only one kind"
            )
        if layer.include:
            keep = any(state_meets_rule(state, r, layer.name) for r in layer.include)
        else:
            keep = not any(
                state_meets_rule(state, r, layer.name) for r in layer.exclude
            )
        if keep:
            filtered.layer.add().CopyFrom(layer)
    return filtered


def split_layer_name(layer_name, blob_name, blob_index):
    """Caffe's name for the split of top ``blob_index`` of ``layer_name``."""
    return f"{blob_name}_{layer_name}_{blob_index}_split"


def split_blob_name(layer_name, blob_name, blob_index, split_index):
    """Caffe's name for top ``split_index`` of that split layer."""
    return f"{split_layer_name(layer_name, blob_name, blob_index)}_{split_index}"


def insert_splits(param):
    """Return ``param`` with Split layers for every fanned-out top.

    An explicit nonzero ``loss_weight`` on a top counts as one more
    consumer; the weight then moves to split top 0 and the producer's entry
    for that top becomes an explicit 0 (Caffe clears the producer's whole
    list instead; see the comment in the code).

    Raises
    ------
    LayerSetupError
        When a bottom names a blob that no earlier layer produces.
    """
    last_producer = {}
    source_of_bottom = {}
    consumers = defaultdict(int)
    loss_weight_of = {}
    for i, layer in enumerate(param.layer):
        for j, name in enumerate(layer.bottom):
            if name not in last_producer:
                raise LayerSetupError(
                    f"unknown bottom blob '{name}' (layer '{layer.name}', bottom "
                    f"index {j}): no earlier layer produces it"
                )
            src = last_producer[name]
            source_of_bottom[(i, j)] = src
            consumers[src] += 1
        for j, name in enumerate(layer.top):
            last_producer[name] = (i, j)
        # Only the listed tops can be fanned out; a loss layer may carry a
        # weight for an automatic (unlisted) top, and the layer's own setup
        # checks that the weights match its real number of tops.
        for j, w in enumerate(layer.loss_weight[: len(layer.top)]):
            loss_weight_of[(i, j)] = w
            if w != 0:
                consumers[(i, j)] += 1

    out = netlite_pb2.NetParameter()
    out.CopyFrom(param)
    del out.layer[:]
    next_split = defaultdict(int)
    for i, layer in enumerate(param.layer):
        new_layer = out.layer.add()
        new_layer.CopyFrom(layer)
        for j, name in enumerate(layer.bottom):
            src = source_of_bottom[(i, j)]
            if consumers[src] > 1:
                producer = param.layer[src[0]].name
                new_layer.bottom[j] = split_blob_name(
                    producer, name, src[1], next_split[src]
                )
                next_split[src] += 1
        split_layers = []
        for j, name in enumerate(layer.top):
            count = consumers[(i, j)]
            if count <= 1:
                continue
            weight = loss_weight_of.get((i, j), 0.0)
            split = netlite_pb2.LayerParameter(
                name=split_layer_name(layer.name, name, j), type="Split"
            )
            split.bottom.append(name)
            for k in range(count):
                split.top.append(split_blob_name(layer.name, name, j, k))
                if weight:
                    split.loss_weight.append(weight if k == 0 else 0.0)
            if weight:
                # The split's top 0 now carries this loss.  Caffe clears the
                # producer's whole loss_weight list, which (a) silently drops
                # the weights of its other tops and (b) lets a loss layer fall
                # back to its default weight 1, counting the loss twice.
                # netlite zeroes only this entry and keeps the explicit 0.
                new_layer.loss_weight[j] = 0.0
                next_split[(i, j)] += 1
            split_layers.append(split)
        for split in split_layers:
            out.layer.add().CopyFrom(split)
    return out
