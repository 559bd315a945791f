"""Writes the small seeds of the `cifar_py` fuzz target (fuzz/corpus/cifar_py/*-small-*).

The fixture batches (4 records, 12-19 KB) are seeds too, but libFuzzer mutates a short input
much faster and reaches the structure of the pickle sooner. These are pickled by Python's own
pickle with numpy's module and function names, as numpy pickles an array (`_reconstruct` and a
BUILD state up to protocol 4, `_frombuffer` with an in-band buffer at protocol 5), with stand-in
modules, so that numpy need not be installed:

    python3 fuzz/make_cifar_py_seeds.py
"""

import os
import pickle
import sys
import types

PIXELS = 3 * 32 * 32


def module(name):
    m = types.ModuleType(name)
    sys.modules[name] = m
    return m


numpy = module("numpy")
multiarray = module("numpy.core.multiarray")
numeric = module("numpy._core.numeric")


def named(obj, mod, name):
    obj.__module__ = mod.__name__
    obj.__qualname__ = obj.__name__ = name
    setattr(mod, name, obj)
    return obj


def _reconstruct(*args):
    raise NotImplementedError


def _frombuffer(*args):
    raise NotImplementedError


named(_reconstruct, multiarray, "_reconstruct")
named(_frombuffer, numeric, "_frombuffer")


class ndarray:
    pass


class dtype:
    def __init__(self, code, align=False, copy=True):
        self.code = code

    def __reduce__(self):
        return (dtype, (self.code, False, True), (3, "|", None, None, None, -1, -1, 0))


named(ndarray, numpy, "ndarray")
named(dtype, numpy, "dtype")


class Array:
    """A C-order uint8 array of `rows` x 3072 bytes, reduced as numpy reduces one."""

    def __init__(self, raw, protocol):
        self.raw, self.protocol = raw, protocol

    def __reduce_ex__(self, protocol):
        shape = (len(self.raw) // PIXELS, PIXELS)
        if protocol >= 5:
            return (_frombuffer, (bytearray(self.raw), dtype("u1"), shape, "C"))
        return (_reconstruct, (ndarray, (0,), b"b"), (1, shape, dtype("u1"), False, self.raw))


def batch(rows, protocol):
    raw = bytes((k * 13 + p * 3) % 256 for k in range(rows) for p in range(PIXELS))
    return {
        "batch_label": "training batch 1 of 5",
        "labels": [(3 * k + 1) % 10 for k in range(rows)],
        "data": Array(raw, protocol),
        "filenames": ["image_%d.png" % k for k in range(rows)],
    }


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "cifar_py")
    for rows, protocol in ((0, 2), (0, 4), (0, 5), (1, 4)):
        name = "protocol-%d-small-%d-records" % (protocol, rows)
        with open(os.path.join(out, name), "wb") as f:
            pickle.dump(batch(rows, protocol), f, protocol=protocol)


if __name__ == "__main__":
    main()
