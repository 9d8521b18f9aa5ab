"""Bad data fails by name, or is skipped and counted when asked: a damaged record shard names
the shard, the record and Riegeli's byte offset; `max_bad_records` refills bad slots and the
trainer counts them, stopping once the count passes the limit."""
import os

import numpy as np
import pytest

from sd3jax import config as config_lib
from sd3jax import train
from sd3jax.data import pipeline as P
from sd3jax.data import records
from sd3jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def damaged(tmp_path):
  """50 records in two shards of 25; 64 bytes of the second shard's middle inverted."""
  rng = np.random.default_rng(0)
  manifest = records.write_records(
      str(tmp_path / "rec"), ({"x": rng.standard_normal(4096).astype(np.float32), "i": i}
                              for i in range(50)), kind="test", examples_per_shard=25)
  path = str(tmp_path / "rec" / manifest["shards"][1]["file"])
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    f.seek(0)
    f.write(data)
  source = records.RecordSource(str(tmp_path / "rec"))
  bad = []
  for i in range(50):
    try:
      source[i]
    except records.BadRecordError:
      bad.append(i)
  assert bad and all(i >= 25 for i in bad)  # only the damaged shard, and not all of it
  return source, path, bad


def test_a_damaged_record_names_its_shard_record_and_byte(damaged):
  source, path, bad = damaged
  with pytest.raises(records.BadRecordError) as info:
    source[bad[0]]
  message = str(info.value)
  assert f"bad record in {path}: record {bad[0] - 25} of that shard (example {bad[0]}" in message
  assert "at byte" in message and "max_bad_records" in message
  assert info.value.shard == path and info.value.record == bad[0] - 25
  read = source.read_many([0, bad[0], 1])
  assert isinstance(read[1], records.BadRecordError) and read[0]["i"] == 0 and read[2]["i"] == 1
  with pytest.raises(records.BadRecordError):
    source.__getitems__([0, bad[0]])


class _Plan:
  """Step k: examples [k * 4, k * 4 + 4) of one bucket."""

  def examples(self, step):
    return {"indices": np.arange(step * 4, step * 4 + 4), "bucket": 0, "epoch": 0}


def test_bad_slots_are_refilled_from_the_same_batch_and_marked(damaged):
  source, _, bad = damaged
  step = bad[0] // 4
  transform = lambda ex, i, bucket, epoch: {"i": np.int64(ex["i"])}
  with pytest.raises(records.BadRecordError):
    P._StepBatcher(source, _Plan(), transform)(step)
  batcher = P._StepBatcher(source, _Plan(), transform, skip_bad_records=True)
  batch = batcher(step)
  wanted = list(range(step * 4, step * 4 + 4))
  marked = [i for i in wanted if i in bad]
  assert batch["bad_records"].tolist() == [int(i in bad) for i in wanted]
  assert len(batch["i"]) == 4 and not set(batch["i"].tolist()) & set(marked)
  assert set(batch["i"].tolist()) <= set(wanted)
  assert np.array_equal(batcher(step)["i"], batch["i"])  # the same on a rerun


def _tiny(max_bad_records):
  config = config_lib.load(os.path.join(ROOT, "experiments", "tiny.py"))
  with config.unlocked():
    config.total_steps = 4
    config.checkpoint.every_steps = 100
    config.data.max_bad_records = max_bad_records  # a default key tiny.py does not set
  return config


class _MarkedData:
  """The synthetic batches, with `bad` slots marked on each of the given steps."""

  def __init__(self, config, marks):
    self.inner = synthetic.make_iterator(config_lib.complete(config))
    self.marks, self.step = marks, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.inner))
    n = len(batch["latents"])
    batch["bad_records"] = (np.arange(n) < self.marks.get(self.step, 0)).astype(np.int32)
    self.step += 1
    return batch


def test_trainer_counts_skipped_records_and_stops_past_the_limit(tmp_path):
  config = _tiny(max_bad_records=3)
  result = train.train(config, str(tmp_path / "ok"), data=_MarkedData(config, {1: 1, 2: 2}))
  assert result.step == 4
  assert [r["data/bad_records"] for r in result.history][-1] == 3
  with pytest.raises(records.DataError, match="4 unreadable training records by step 3, more "
                     "than config.data.max_bad_records=3"):
    train.train(config, str(tmp_path / "over"), data=_MarkedData(config, {1: 2, 2: 2}))
