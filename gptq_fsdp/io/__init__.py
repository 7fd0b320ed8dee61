"""Everything written to disk: the checkpoint (checkpoint.py, packing.py), an output path never left
half-written (output.py), and the per-layer state a crashed run resumes from (resume.py)."""
