#!/usr/bin/env python3
"""Export an orbax checkpoint stored as tensorstore (OCDBT: manifest.ocdbt, d/, ...) to one
flax msgpack file, which `mfr import` reads natively. The official JAX MeanFlow release
(MF-B/4, Google Drive) is such a directory when saved with orbax-checkpoint >= 0.5.

    make flax-export CKPT=path/to/checkpoint_<step>     # pinned jax, flax, orbax in .venv-jax
    python tools/export_orbax.py CHECKPOINT_DIR OUT.msgpack

Only arrays and plain values are written (no code, no pickles): the restored tree as
flax.serialization.msgpack_serialize encodes it."""
import sys

import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


def plain(tree):
    """The restored tree with arrays as numpy and tuples as lists, as flax writes state dicts."""
    if isinstance(tree, dict):
        return {str(k): plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [plain(v) for v in tree]
    if tree is None:
        return None
    return np.asarray(tree)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source, out = sys.argv[1], sys.argv[2]
    state = ocp.PyTreeCheckpointer().restore(source)
    with open(out + ".tmp", "wb") as f:
        f.write(serialization.msgpack_serialize(plain(state)))
    import os
    os.replace(out + ".tmp", out)
    print(f"{source} -> {out}")


if __name__ == "__main__":
    main()
