"""Batches of sample ids kept as the server sent them.

A bulk operation reads the ids of its targets once and then only passes them
on: into the journal, into the capture of prior values and into the write.
Decoding 100k ``ObjectId`` objects costs about 0.15 s of Python and encoding
them back into each command about 0.03 s, so an :class:`IdBatch` keeps the
raw BSON array and splices it into the commands' documents. The ids are
decoded only where Python needs them (undo, tests).
"""

import struct

import bson
from bson.raw_bson import RawBSONDocument

_ARRAY = 0x04
_DOCUMENT = 0x03

#: Sizes of the BSON values that can appear beside an id array in the
#: documents read here (``None``: an int32 length prefix gives the size)
_FIXED_SIZES = {
    0x01: 8,  # double
    0x07: 12,  # ObjectId
    0x08: 1,  # bool
    0x09: 8,  # datetime
    0x0A: 0,  # null
    0x10: 4,  # int32
    0x11: 8,  # timestamp
    0x12: 8,  # int64
}


class IdBatch(object):
    """A batch of sample ids as one raw BSON array.

    Args:
        array: the bytes of a BSON array of ObjectIds (its length prefix
            included)
        count: the number of ids in it
    """

    __slots__ = ("array", "count", "_ids")

    def __init__(self, array, count):
        self.array = bytes(array)
        self.count = int(count)
        self._ids = None

    @classmethod
    def from_ids(cls, ids):
        """An :class:`IdBatch` of a list of ObjectIds."""
        ids = list(ids)
        encoded = bson.encode({"ids": ids})
        batch = cls(_element_value(encoded, "ids"), len(ids))
        batch._ids = ids
        return batch

    @classmethod
    def of(cls, batch):
        """``batch`` itself if it is an :class:`IdBatch`, else one made of
        its ids."""
        return batch if isinstance(batch, cls) else cls.from_ids(batch)

    @classmethod
    def from_document(cls, raw, key="ids", count_key="count"):
        """The id array of a raw document that also holds its size."""
        return split_document(raw, key, count_key)[1]

    def __len__(self):
        return self.count

    @property
    def ids(self):
        """The ids, decoded (once)."""
        if self._ids is None:
            doc = _document(_element(_ARRAY, "ids", self.array))
            self._ids = bson.decode(doc)["ids"]
        return self._ids

    def query(self, conditions=None):
        """The query ``{"_id": {"$in": <these ids>}, **conditions}``."""
        conditions = conditions or {}
        if "_id" in conditions:
            raise ValueError("conditions on _id would be overwritten")
        in_ids = _document(_element(_ARRAY, "$in", self.array))
        body = _element(_DOCUMENT, "_id", in_ids) + _elements(conditions)
        return RawBSONDocument(_document(body))

    def document(self, fields, key="ids", count_key="count"):
        """``fields`` plus these ids (and their count), to store."""
        body = _elements(dict(fields, **{count_key: self.count}))
        body += _element(_ARRAY, key, self.array)
        return RawBSONDocument(_document(body))

    def split(self, size):
        """Batches of at most ``size`` of these ids."""
        if self.count <= size:
            return [self]
        ids = self.ids
        return [
            IdBatch.from_ids(ids[start:start + size])
            for start in range(0, len(ids), size)
        ]


def split_document(raw, key="ids", count_key="count"):
    """Splits a raw document that holds an id array and its size into
    ``(its other fields, decoded; an IdBatch)``."""
    others = b""
    array = count = None
    for name, (kind, value) in _iter_elements(raw):
        if name == key:
            if kind != _ARRAY:
                raise ValueError("'%s' is not an array" % key)
            array = value
            continue
        if name == count_key:
            count = struct.unpack("<i" if kind == 0x10 else "<q", value)[0]
        others += _element(kind, name, value)

    if array is None or count is None:
        raise KeyError("the document has no '%s' and '%s'" % (key, count_key))

    return bson.decode(_document(others)), IdBatch(array, count)


def _element(kind, key, value):
    return bytes([kind]) + key.encode() + b"\x00" + value


def _document(body):
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def _elements(mapping):
    """The encoded elements of a mapping (a BSON document's body)."""
    return bson.encode(mapping)[4:-1] if mapping else b""


def _iter_elements(raw):
    """Yields ``(key, (type, value bytes))`` of a raw document's top-level
    elements, without decoding them."""
    data = raw.raw if isinstance(raw, RawBSONDocument) else raw
    pos, end = 4, len(data) - 1
    while pos < end:
        kind = data[pos]
        key_end = data.index(b"\x00", pos + 1)
        key = data[pos + 1:key_end].decode()
        pos = key_end + 1
        if kind in _FIXED_SIZES:
            size = _FIXED_SIZES[kind]
        elif kind in (_DOCUMENT, _ARRAY):
            size = struct.unpack_from("<i", data, pos)[0]
        elif kind == 0x02:  # string
            size = 4 + struct.unpack_from("<i", data, pos)[0]
        else:
            raise ValueError("unexpected BSON type 0x%02x in '%s'" % (kind, key))
        yield key, (kind, data[pos:pos + size])
        pos += size


def _element_value(raw, key):
    for name, (_, value) in _iter_elements(raw):
        if name == key:
            return value
    raise KeyError(key)
