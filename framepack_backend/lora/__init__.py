"""LoRA per request: low-rank adapters from a server-side folder, applied to one job.

- `choices.py`: what a request may ask for (names in the folder, strengths), torch-free.
- `formats.py`: a LoRA safetensors file in any supported key convention → factors keyed
  by our module names, checked against the model.
- `folder.py`: the allow-listed folder, its listing for `describe`, and a host-memory
  cache of parsed files bounded by bytes (least recently used out).
- `apply.py`: the context manager that adds the low-rank path beside the adapted layers
  for one job and takes it away after.
- `merge.py`: the merge once into the weights and its exact undo.
- `footprint.py`: the device bytes a job's LoRAs hold, for the memory planner.
"""
