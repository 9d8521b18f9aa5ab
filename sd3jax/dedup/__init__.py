"""Near-duplicate removal and memorisation checks (the SD3 paper's SSCD procedure).

  descriptors        what --descriptor names: CopyNet (copy_net.py), SSCD, thumbnail, a factory
  embed              descriptors of a source, sharded over processes and devices, resumable
  score_norm         SSCD's score normalisation against a background of non-copies
  cluster            faiss kNN -> pairs above the threshold -> clusters -> filter + report
  filter             the filter folder, and FilteredSource (what precompute / pipelines read)
  memorisation       generations of a run against its training images
  shapes_duplicates  a shapes record set with injected copies; demo: the procedure, scored
  bench              descriptors/s, kNN queries/s, index memory
"""

from sd3jax.data.records import DataError


class DedupError(DataError):
  """Inputs or settings that cannot work together; the message names them and the fix.
  A DataError, so every command reports it as one line with exit code 2."""
