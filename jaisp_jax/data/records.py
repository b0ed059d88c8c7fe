"""Chip records of the TFDS dataset: a fast decoder and a bounded in-memory cache.

`ChipDecoder` decodes only the chip of a serialized record (what a pair needs) from a
TFDS array_record source; `RecordCache` keeps decoded chips (and their band-valid
vectors) in memory, least recently used first out, per process. Both are used by the
pipeline's `PairElement` (pipeline.py); neither changes a value the pipeline yields.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Mapping, Sequence

import numpy as np

class ChipDecoder:
  """Decodes only the chip (the ``instruments`` part) of a serialized TFDS record.

  TFDS's generic numpy parser turns every feature of a record (ids, truth rows, sky
  position, ...) into arrays through a flatten / nest pass and a few copies, which
  costs more than making a pair. The pipeline needs only the chip, so this finds the
  chip's features in the serialized ``tf.train.Example`` (a scan of the protobuf wire
  format) and converts each as TFDS would: ``np.frombuffer(...).reshape(shape)`` for
  tensors stored as bytes (here viewing the record's bytes in place, read-only like
  TFDS's, no copy of the image planes), ``np.array(values, dtype)`` of the value list
  parsed by TFDS's protobuf ``Feature`` message otherwise, ``.item()`` for scalars:
  the same arrays, dtypes, shapes and key order.
  """

  def __init__(self, fields: Sequence[tuple[str, str, str, Any, tuple[int, ...], bool]]):
    # (instrument, key, proto feature key, numpy dtype, shape, stored as raw bytes)
    self.fields = tuple(fields)
    self._wanted = frozenset(f[2].encode() for f in self.fields)

  @classmethod
  def for_source(cls, source) -> 'ChipDecoder | None':
    """A decoder for a TFDS array_record source of chip records, else None.

    None (decode with TFDS) for any other source and for features this does not
    handle (dynamic shapes, compressed encodings, uint64, custom decoders).
    """
    try:
      from tensorflow_datasets.core import decode
      from tensorflow_datasets.core.data_sources import array_record
      from tensorflow_datasets.core.features import features_dict
      from tensorflow_datasets.core.features import tensor_feature
    except ImportError:
      return None
    if (not isinstance(source, array_record.ArrayRecordDataSource) or source.decoders
        or source.deserialize_method != decode.DeserializeMethod.DESERIALIZE_AND_DECODE):
      return None
    features = source.dataset_info.features
    if not isinstance(features, features_dict.FeaturesDict) or 'instruments' not in features:
      return None
    fields = []
    for inst, part in features['instruments'].items():
      if not isinstance(part, features_dict.FeaturesDict):
        return None
      for key, feat in part.items():
        # Scalar is a Tensor of shape (); the exact class guards against subclasses
        # with their own decoding (Image, Text, ...).
        if type(feat).__name__ not in ('Tensor', 'Scalar') or not isinstance(
            feat, tensor_feature.Tensor):
          return None
        shape = tuple(feat.shape)
        encoding = feat._encoding  # pylint: disable=protected-access
        if (any(d is None or d < 0 for d in shape) or feat.np_dtype == np.uint64
            or encoding not in (tensor_feature.Encoding.NONE, tensor_feature.Encoding.BYTES)):
          return None
        fields.append((inst, key, f'instruments/{inst}/{key}', feat.np_dtype, shape,
                       encoding == tensor_feature.Encoding.BYTES))
    return cls(sorted(fields, key=lambda f: f[:2]))  # TFDS's (sorted) key order

  def __call__(self, serialized: bytes) -> dict[str, dict[str, Any]]:
    from tensorflow_datasets.proto import tf_feature_pb2
    buf = memoryview(serialized)
    spans = _feature_spans(buf, self._wanted)
    chip: dict[str, dict[str, Any]] = {}
    for inst, key, proto_key, dtype, shape, as_bytes in self.fields:
      if proto_key not in spans:
        raise ValueError(f'record has no value for {proto_key}')
      start, end = spans[proto_key]
      # The big tensors (image, rms) are viewed in place in the record's bytes,
      # read-only (as TFDS's np.frombuffer of a copy); the rest is tiny: protobuf.
      data = _single_bytes_value(buf, start, end) if as_bytes else None
      if data is not None:
        value = np.frombuffer(data, dtype=dtype).reshape(shape)
      else:
        f = tf_feature_pb2.Feature.FromString(bytes(buf[start:end]))
        kind = f.WhichOneof('kind')
        if kind is None:
          raise ValueError(f'record has no value for {proto_key}')
        values = getattr(f, kind).value
        if as_bytes:
          value = np.frombuffer(values[0], dtype=dtype).reshape(shape)
        else:
          value = np.array(values, dtype=dtype)
          value = value.reshape(shape) if shape else value.item()
      chip.setdefault(inst, {})[key] = value
    return chip


# Protocol buffer wire format, just enough to find the features of a serialized
# tf.train.Example (Example.features = 1 -> Features.feature = 1, a map whose entries
# have key = 1, value = 2 -> Feature.bytes_list = 1 -> BytesList.value = 1) without
# copying the bytes of the big tensors.


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[i]
    i += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, i
    shift += 7


def _len_fields(buf: memoryview, start: int, end: int):
  """(field number, start, end) of the length-delimited fields of a message."""
  i = start
  while i < end:
    tag, i = _varint(buf, i)
    wire = tag & 7
    if wire == 2:
      n, i = _varint(buf, i)
      yield tag >> 3, i, i + n
      i += n
    elif wire == 0:
      _, i = _varint(buf, i)
    elif wire in (1, 5):
      i += 8 if wire == 1 else 4
    else:
      raise ValueError(f'unsupported protobuf wire type {wire}')
  if i != end:
    raise ValueError('truncated protobuf message')


def _feature_spans(buf: memoryview, wanted: frozenset[bytes]) -> dict[str, tuple[int, int]]:
  """Feature key -> (start, end) of its serialized Feature, for the wanted keys."""
  spans = {}
  for number, start, end in _len_fields(buf, 0, len(buf)):
    if number != 1:
      continue
    for entry_number, e_start, e_end in _len_fields(buf, start, end):
      if entry_number != 1:
        continue
      key = span = None
      for field, f_start, f_end in _len_fields(buf, e_start, e_end):
        if field == 1:
          key = bytes(buf[f_start:f_end])
        elif field == 2:
          span = (f_start, f_end)
      if key in wanted and span is not None:
        spans[key.decode()] = span  # the last entry of a key wins, as in protobuf
  return spans


def _single_bytes_value(buf: memoryview, start: int, end: int) -> memoryview | None:
  """The value of a Feature holding a BytesList of exactly one value, else None."""
  lists = list(_len_fields(buf, start, end))
  if len(lists) != 1 or lists[0][0] != 1:
    return None
  values = list(_len_fields(buf, lists[0][1], lists[0][2]))
  if len(values) != 1 or values[0][0] != 1:
    return None
  return buf[values[0][1]:values[0][2]]


def _nbytes(tree: Any) -> int:
  if isinstance(tree, Mapping):
    return sum(_nbytes(v) for v in tree.values())
  return int(getattr(tree, 'nbytes', 0))


class RecordCache:
  """Bounded cache of decoded chips (and their band-valid vectors), one per process.

  Decoding a record costs more than making a pair from it, and a record holds every
  band while a pair uses two, so each chip is read and decoded once and then reused
  by the pairs of later epochs (all of them when the split fits in `max_bytes`).
  Eviction is least-recently-used; it decides only what is decoded again, never a
  value, so the pipeline's output is the same with any cache size (and with grain
  workers, each of which holds its own cache). Shared by the reading threads.
  """

  def __init__(self, max_bytes: int):
    self.max_bytes = int(max_bytes)
    self._entries: collections.OrderedDict[int, tuple[Any, np.ndarray, int]] = (
        collections.OrderedDict())
    self._bytes = 0
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  def get(self, index: int, load) -> tuple[Any, np.ndarray]:
    """(chip, valid) of record `index`; `load(index)` computes them on a miss."""
    if self.max_bytes <= 0:
      return load(index)
    with self._lock:
      entry = self._entries.get(index)
      if entry is not None:
        self._entries.move_to_end(index)
        self.hits += 1
        return entry[0], entry[1]
      self.misses += 1
    chip, valid = load(index)  # outside the lock: other threads keep reading
    size = _nbytes(chip)
    if size <= self.max_bytes:
      with self._lock:
        if index not in self._entries:
          self._entries[index] = (chip, valid, size)
          self._bytes += size
          while self._bytes > self.max_bytes:
            _, (_, _, old) = self._entries.popitem(last=False)
            self._bytes -= old
    return chip, valid

  @property
  def nbytes(self) -> int:
    return self._bytes

  def __len__(self) -> int:
    return len(self._entries)

  # A worker process gets an empty cache (and a new lock) when the element is pickled.
  def __getstate__(self):
    return {'max_bytes': self.max_bytes}

  def __setstate__(self, state):
    self.__init__(state['max_bytes'])
