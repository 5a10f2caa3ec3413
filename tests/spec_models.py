"""Models whose MTP drafts are right by construction, for speculative-decoding tests.

The trunk's residual branches (o_proj, down_proj) are scaled by `eps`: at eps=0 every
layer passes its input through, so the trunk maps token x to lm_head(norm(embed(x))),
and lm_head is built so that this is the successor x + 1 (mod V). Each MTP block takes
the embedding half of eh_proj only (h_k = enorm(embed(x_{t+k}))) and its head predicts
the successor too, so its drafts match the trunk exactly. With eps > 0 the attention and
MLP outputs leak in and the trunk sometimes departs from the successor map: drafts are
then partly rejected, while caches and sliding windows really shape the trunk's output.
"""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_step35 import load

HEAD_SCALE = 8.0


def successor_model(path, eps: float = 0.0, chain=None):
    """`chain` (token ids c_0, c_1, ...): instead of x + 1, c_i's successor is c_{i+1} (the ids must
    be distinct), so a prompt ending in c_0 makes the model emit c_1, c_2, ... exactly."""
    model, tokenizer = load(path, quantize=False, dtype="float32")
    V, H = model.args.vocab_size, model.args.hidden_size
    E = model.model.embed_tokens.weight
    unit = E * mx.rsqrt(mx.mean(E * E, axis=-1, keepdims=True) + model.args.rms_norm_eps)
    if chain is None:
        head = unit[(mx.arange(V) - 1) % V] * (HEAD_SCALE / H)  # row y scores predecessor y - 1
    else:
        assert len(set(chain)) == len(chain), "a chain's ids must be distinct"
        head = mx.zeros((V, H))
        head[mx.array(chain[1:])] = unit[mx.array(chain[:-1])]
        head = head * (HEAD_SCALE / H)
    updates = [("lm_head.weight", head), ("model.norm.weight", mx.ones((H,)))]
    for name, w in tree_flatten(model.parameters()):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            updates.append((name, w * eps))
    for j, block in enumerate(model.mtp):
        updates += [
            (f"mtp.{j}.eh_proj.weight", mx.concatenate([mx.eye(H), mx.zeros((H, H))], axis=1)),
            (f"mtp.{j}.enorm.weight", mx.ones((H,))),
            (f"mtp.{j}.shared_head.norm.weight", mx.ones((H,))),
            (f"mtp.{j}.shared_head.output.weight", head),
        ]
    model.update(tree_unflatten(updates))
    return model, tokenizer
