"""torchvision's pure-Python model zoo, importable next to a CPU-only torch.

The only torchvision wheel that pairs with torch 2.13.0 is built against CUDA torch: at
import it registers fake (meta) kernels for its C++ ops (`torchvision::nms`, ...) with
`torch.library.register_fake`, which raises "operator torchvision::nms does not exist"
because its C extension cannot load. The tests only need `torchvision.models` (pure
Python), so when the normal import fails, it is retried with `register_fake` replaced by
a no-op decorator factory for the duration of the import. The ops themselves stay
unusable; the model zoo works.
"""
import sys
import types

import torch


def import_torchvision() -> types.ModuleType:
  """The torchvision module: a normal import if it works, else the register_fake detour."""
  try:
    import torchvision
    return torchvision
  except RuntimeError:
    pass
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]  # half-imported modules from the failed attempt
  original = torch.library.register_fake
  torch.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
  try:
    import torchvision
  finally:
    torch.library.register_fake = original
  return torchvision
