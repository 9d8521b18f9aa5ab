"""Weight exchange with the PyTorch world (diffusers / transformers folder layouts)."""
